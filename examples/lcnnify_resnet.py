"""The README's 10-line example: build a timm model, lcnnify it, train one step with the LCNN
penalty, measure curvature, fold it for deployment. Runs in a few seconds on a CPU."""
import timm
import torch
import torch.nn.functional as F

from lcnn_zoo import LCNNPenalty, curvature_stats, fold, lcnnify, param_groups

model = lcnnify(timm.create_model("resnet18", num_classes=10), input_size=(3, 32, 32), bn_affine=False)
opt = torch.optim.SGD(param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
loss = F.cross_entropy(model(x), y) + LCNNPenalty(lambda_beta=1e-3, lambda_gamma=1e-3)(model)
loss.backward()
opt.step()
stats = curvature_stats(model, x, y, n_iter=10)
print(f"loss {loss.item():.3f}  curvature {stats.curvature.mean():.3g}  "
      f"|grad| {stats.grad_norm.mean():.3g}  |Hessian| {stats.hessian_norm.mean():.3g}")
deployable = fold(model)  # plain conv/BN-fused modules, identical eval outputs
print(model.lcnn_report)
