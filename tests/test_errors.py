"""lcnn_zoo.errors: what a message shows of user input is bounded in size and in time, and a
DataLoader worker's re-raised traceback becomes its one original line."""
import time
from pathlib import Path

from lcnn_zoo.errors import MAX_MESSAGE, Interrupted, UserError, one_line, shown


def test_shown_is_bounded_for_long_nested_and_unprintable_values():
    assert shown("lcnn_resnet20") == "'lcnn_resnet20'"
    assert shown("a\nb") == "'a\\nb'"  # not printable as is: quoted, on one line
    long = shown("x" * 10_000)
    assert len(long) <= 80 and "..." in long
    deep = []
    for _ in range(50):
        deep = [deep] * 2
    t = time.perf_counter()
    text = shown(deep)  # 2**50 leaves if walked: cut at depth 2
    assert time.perf_counter() - t < 1.0 and len(text) <= 80
    path = shown(Path("/data/" + "d" * 300 + "/images"))
    assert path.startswith("…") and path.endswith("/images") and len(path) <= 160


def test_one_line_keeps_a_workers_original_message_and_caps_the_length():
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise UserError("cannot read a.png")\nUserError: cannot read a.png\n')
    assert one_line(wrapped) == "cannot read a.png"
    assert one_line("two\n   lines") == "two lines"
    capped = one_line("y" * 5000)
    assert len(capped) == MAX_MESSAGE and capped.endswith("…")


def test_the_exception_types():
    assert issubclass(UserError, Exception) and not issubclass(UserError, KeyboardInterrupt)
    stop = Interrupted("run it again with --resume auto")
    assert isinstance(stop, KeyboardInterrupt) and stop.hint == "run it again with --resume auto"
