"""torch.hub entry points: one per model registered by lcnn_zoo, e.g.

    torch.hub.load("<owner>/lcnn-zoo", "lcnn_resnet18", pretrained=True)

Each entry takes timm's ``create_model`` keyword arguments (``pretrained``, ``num_classes``, ...).
Pretrained tags: ``torch.hub.load(..., "lcnn_resnet20", pretrained=True, pretrained_cfg="fmnist")``.
"""
dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors"]

import timm as _timm  # noqa: E402

import lcnn_zoo as _lcnn_zoo  # noqa: E402,F401  (registers the models)


def _entry(name):
    def create(pretrained: bool = False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"timm.create_model({name!r}, pretrained=..., **kwargs)"
    return create


for _name in _timm.list_models("lcnn_*"):
    globals()[_name] = _entry(_name)
