"""JSON writer, plot saver, texts."""
import json
import math
import os

import numpy as np
import pytest
import torch

import utils
from utils import UserInputError, load_texts, read_texts_file, to_jsonable, tokenize_texts, write_json


def test_to_jsonable_converts_numpy_torch_and_nonfinite():
    data = {"a": np.float32(1.5), "b": np.arange(3), "c": torch.tensor([[1.0, float("nan")]]),
            "d": [float("inf"), -float("inf"), 2], "e": torch.tensor(7), "f": np.bool_(True),
            "g": torch.bfloat16}
    out = to_jsonable(data)
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": [[1.0, None]], "d": [None, None, 2], "e": 7, "f": True,
                   "g": "torch.bfloat16"}
    json.dumps(out, allow_nan=False)


def test_write_json_is_atomic_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"x": np.float64(math.pi)})
    assert json.loads(path.read_text()) == {"x": math.pi}
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": math.pi}  # the earlier file is intact
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind


def test_save_figure_writes_a_png(tmp_path):
    utils.use_agg_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = utils.save_figure(fig, tmp_path / "plots", "line")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not plt.get_fignums()  # closed


def test_read_texts_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first text\n\n   \nsecond text  \n")
    assert read_texts_file(f) == ["first text", "second text"]
    with pytest.raises(UserInputError, match="no such file"):
        read_texts_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserInputError, match="no non-blank lines"):
        read_texts_file(tmp_path / "empty.txt")
    assert load_texts(f, limit=1).texts == ["first text"]
    with pytest.raises(UserInputError):
        load_texts(f, limit=0)


def test_default_texts_fall_back_to_shipped_texts_with_a_warning(monkeypatch):
    monkeypatch.setattr(utils, "_HUB_REACHABLE", False)
    ts = load_texts(None, limit=7)  # no WikiText in the cache here and no hub: the shipped texts
    if ts.source.startswith("offline:"):
        assert ts.warning and "shipped in the repo" in ts.warning
        assert ts.texts == read_texts_file(utils.OFFLINE_TEXTS_PATH)[:7]
    else:  # a machine that has WikiText-2 cached uses it, silently
        assert ts.warning is None and len(ts.texts) == 7


def test_tokenize_texts_truncates_and_counts(tokenizer):
    texts = ["a b c d e f g h i j k l m n o p", "short"]
    full = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    tt = tokenize_texts(tokenizer, texts, max_length=5)
    assert full > 5 and tt.n_truncated == 1 and tt.lengths[0] == 5
    assert tt.input_ids[1].shape == (1, len(tokenizer("short", add_special_tokens=False)["input_ids"]))


def test_read_texts_file_refuses_folders_and_non_utf8_and_drops_the_byte_order_mark(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfThe first text\r\nthe second\r\n")
    assert read_texts_file(bom) == ["The first text", "the second"]  # no U+FEFF in the first text
    with pytest.raises(UserInputError, match="is a folder, not a file"):
        read_texts_file(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xef\xbb\xbfok\nstill ok\nnot \xff ok\n")
    with pytest.raises(UserInputError, match=r"bad.txt: not UTF-8 \(byte 0xff at byte position 19, line 3\)"):
        read_texts_file(bad, flag="--prompts_file")
    assert bad.read_bytes()[19] == 0xFF


def test_text_list_refuses_a_bare_string_and_empty_input(tokenizer):
    from utils import text_list

    assert text_list(("a", "b")) == ["a", "b"]
    for value, message in (("one text", "not a single string"), ([], "is empty"), (["a", None], "must be strings"),
                           (5, "list of strings")):
        with pytest.raises(ValueError, match=message):
            text_list(value)
    with pytest.raises(ValueError, match="not a single string"):
        tokenize_texts(tokenizer, "a text passed bare", 16)


def test_check_writable_dir_creates_nothing_and_names_the_problem(tmp_path):
    from utils import check_writable_dir

    assert check_writable_dir(tmp_path / "new" / "deeper", "--plots_dir") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # probed, not created
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserInputError, match="--plots_dir .*f: is a file, not a folder"):
        check_writable_dir(tmp_path / "f", "--plots_dir")
    with pytest.raises(UserInputError, match="cannot be created, .*f is a file"):
        check_writable_dir(tmp_path / "f" / "sub", "--plots_dir")
    with pytest.raises(UserInputError, match="--output_dir /proc/x: cannot be created in /proc"):
        check_writable_dir("/proc/x", "--output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
def test_check_writable_dir_refuses_a_read_only_folder(tmp_path):
    from utils import check_writable_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserInputError, match="cannot write in it"):
            check_writable_dir(ro, "--output_dir")
    finally:
        ro.chmod(0o755)


def test_texts_end_at_line_breaks_only(tmp_path):
    """\\n, \\r\\n and \\r end a text; form feed, U+2028, U+2029, NEL and \\x1c-\\x1e stay inside it."""
    from utils import read_texts_file

    inside = "a\x0cb\u2028c\u2029d\x85e\x1cf\x1dg\x1eh"
    path = tmp_path / "t.txt"
    path.write_text(f"{inside}\none\r\ntwo\rthree\n", encoding="utf-8", newline="")
    assert read_texts_file(path) == [inside, "one", "two", "three"]


def test_a_long_text_is_tokenized_only_as_far_as_max_length_with_the_same_ids(tokenizer):
    from utils import OFFLINE_TEXTS_PATH, read_texts_file, token_prefix, tokenize_texts

    texts = read_texts_file(OFFLINE_TEXTS_PATH)
    long = " ".join(texts) * 3
    for text in [*texts[:20], long, "x" * 3000, "\u00e9" * 2000 + " word"]:
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        for n in (1, 7, 64, 300):
            assert token_prefix(tokenizer, text, n) == (full[:n], len(full) > n)
    calls = []

    class Counting:  # records how many characters each call tokenizes
        def __call__(self, text, **kw):
            calls.append(len(text))
            return tokenizer(text, **kw)

    huge = long * 200  # a few MB on one line
    tok = tokenize_texts(Counting(), [huge], max_length=16)
    assert tok.lengths == [16] and tok.n_truncated == 1 and max(calls) < 10_000 < len(huge)


def test_trace_refuses_a_path_given_twice():
    import torch

    from utils import trace

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'0' given more than once"):
        with trace(model, ["0", "0"]):
            pass
