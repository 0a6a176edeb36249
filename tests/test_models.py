"""User models given as package.module:function."""

import pytest
import torch
from torch import nn

from spdy_gpu import SpdyError
from spdy_gpu.models import ModelSetting, load_model


def sized_model(batch_size: int = 1, seq_len: int = 8):
    return nn.Linear(4, 4).eval(), torch.randn(batch_size, seq_len, 4)


def fixed_model():
    return nn.Linear(4, 4).eval(), torch.randn(1, 8, 4)


def not_a_pair():
    return nn.Linear(4, 4)


def swapped_pair():
    return torch.zeros(1, 4), nn.Linear(4, 4)


def test_the_setting_reaches_the_keywords_the_function_takes():
    _, example = load_model("tests.test_models:sized_model").build(
        ModelSetting(batch_size=3, seq_len=5))
    assert example.shape == (3, 5, 4)


def own_image_size(image_size=None):
    """A CNN that picks its own input shape unless told."""
    height, width = (48, 80) if image_size is None else (image_size, image_size)
    return nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, height, width)


def any_keywords(**kwargs):
    return nn.Linear(4, 4).eval(), torch.randn(1, kwargs.get("seq_len", 8), 4)


def test_unset_sizes_are_the_functions_own_defaults():
    entry = load_model("tests.test_models:sized_model")
    assert entry.resolve(ModelSetting()) == ModelSetting(seq_len=8)
    assert entry.build(ModelSetting())[1].shape == (1, 8, 4)          # not 128
    cnn = load_model("tests.test_models:own_image_size")
    assert cnn.resolve(ModelSetting()) == ModelSetting()             # None: its own choice
    assert cnn.build(ModelSetting())[1].shape == (1, 3, 48, 80)      # not 224 x 224
    assert cnn.build(ModelSetting(image_size=32))[1].shape == (1, 3, 32, 32)
    keywords = load_model("tests.test_models:any_keywords")           # **kwargs takes all
    assert keywords.build(ModelSetting(seq_len=5))[1].shape == (1, 5, 4)
    assert keywords.build(ModelSetting())[1].shape == (1, 8, 4)       # nothing imposed
    builtin = load_model("minilm")
    assert builtin.resolve(ModelSetting()) == ModelSetting(seq_len=128, image_size=224)


@pytest.mark.parametrize("spec, message", [
    (":build", "unknown model"),
    ("tests.test_models:", "unknown model"),
    ("tests.test_models:PROJECTIONS", "not a function"),
])
def test_malformed_or_uncallable_model_specs_are_one_line_errors(spec, message):
    with pytest.raises(SpdyError, match=message):
        load_model(spec)


PROJECTIONS = 5


@pytest.mark.parametrize("setting, option", [
    (ModelSetting(seq_len=64), "--seq-len"),
    (ModelSetting(image_size=32), "--image-size"),
])
def test_an_option_the_function_cannot_take_is_refused(setting, option):
    entry = load_model("tests.test_models:fixed_model")
    with pytest.raises(SpdyError, match=f"so {option} cannot apply"):
        entry.build(setting)
    assert entry.build(ModelSetting())[1].shape == (1, 8, 4)      # defaults are fine


def batch_four_model():
    return nn.Linear(4, 4).eval(), torch.randn(4, 8, 4)


@pytest.mark.parametrize("batch_size, error", [
    (None, None), (4, None), (2, "batch 4, not --batch-size 2"),
])
def test_a_function_without_batch_keyword_keeps_its_examples_batch(batch_size, error):
    entry = load_model("tests.test_models:batch_four_model")
    if error:
        with pytest.raises(SpdyError, match=error):
            entry.build(ModelSetting(batch_size=batch_size))
    else:
        assert entry.build(ModelSetting(batch_size=batch_size))[1].shape[0] == 4


def test_a_function_with_batch_keyword_keeps_its_default_when_none_is_asked():
    _, example = load_model("tests.test_models:sized_model").build(ModelSetting())
    assert example.shape[0] == 1


@pytest.mark.parametrize("spec, match", [
    ("nosuchmodel", "unknown model 'nosuchmodel'"),
    ("tests.no_such_module:f", "cannot load model function"),
    ("tests.test_models:missing", "cannot load model function"),
])
def test_unknown_models_are_named(spec, match):
    with pytest.raises(SpdyError, match=match):
        load_model(spec)


@pytest.mark.parametrize("function, got", [("not_a_pair", "Linear"),
                                           ("swapped_pair", r"tuple \(Tensor, Linear\)")])
def test_a_function_must_return_model_and_example(function, got):
    with pytest.raises(SpdyError, match=r"must return \(torch.nn.Module, example_input\), "
                                        f"got {got}$"):
        load_model(f"tests.test_models:{function}").build(ModelSetting())


def unbatched():
    return nn.Linear(64, 8), torch.randn(64)


def batch_of_ids():
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2)), torch.randint(0, 10, (4,))


def test_an_example_without_a_batch_dimension_is_refused_but_a_batch_of_ids_is_not():
    with pytest.raises(SpdyError, match=r"returned an example input of shape \[64\], with no "
                                        r"batch dimension; .* \(\[1, 64\]\)"):
        load_model("tests.test_models:unbatched").build(ModelSetting())
    _, ids = load_model("tests.test_models:batch_of_ids").build(ModelSetting())
    assert ids.shape == (4,)


def raising_model():
    raise RuntimeError("weights file not found\nsecond line")


def test_a_model_function_that_raises_is_a_one_line_error():
    entry = load_model("tests.test_models:raising_model")
    with pytest.raises(SpdyError, match="raised RuntimeError: weights file not found;") as info:
        entry.build(ModelSetting())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source, match", [
    ("def f(:\n", "raised SyntaxError: invalid syntax .*; fix the module"),
    ("x = undefined_name + 1\n", "raised NameError: name 'undefined_name' is not defined; fix"),
    ("import sys\nsys.exit(0)\n", r"exited \(status 0\); move its script code"),
    ("import argparse\nargparse.ArgumentParser().parse_args(['--lr'])\n",
     r"exited \(status 2, after printing '.*error: unrecognized arguments: --lr'\); move"),
])
def test_a_module_that_fails_to_import_is_named_with_its_error(tmp_path, monkeypatch, capsys,
                                                               source, match):
    (tmp_path / "broken_user_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpdyError, match="importing broken_user_module for --model "
                                        f"broken_user_module:f {match}") as info:
        load_model("broken_user_module:f")
    assert "\n" not in str(info.value)
    assert capsys.readouterr().err == ""       # no usage block above the one-line error


def test_what_a_module_prints_while_importing_still_reaches_stderr(tmp_path, monkeypatch,
                                                                   capsys):
    (tmp_path / "chatty_user_module.py").write_text(
        "import sys\nprint('loading weights', file=sys.stderr)\ndef f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_model("chatty_user_module:f")
    assert capsys.readouterr().err == "loading weights\n"


def test_a_builtin_without_a_signature_is_refused_with_the_fix():
    with pytest.raises(SpdyError, match="torch:randn has no Python signature to read"):
        load_model("torch:randn")


def exiting_model(batch_size=1):
    import sys
    sys.exit(0)


def parsing_model(batch_size=1):
    import argparse
    argparse.ArgumentParser().parse_args(["--lr"])


@pytest.mark.parametrize("function, said", [
    ("exiting_model", ""),
    ("parsing_model", ", after printing '.*error: unrecognized arguments: --lr'"),
])
def test_a_model_function_that_exits_is_a_one_line_error_not_a_silent_success(capsys, function,
                                                                               said):
    entry = load_model(f"tests.test_models:{function}")
    with pytest.raises(SpdyError, match=rf"model function {function} for --model "
                                        rf"tests.test_models:{function} exited \(status "
                                        rf"\d{said}\); move its script code") as info:
        entry.build(ModelSetting())
    assert "\n" not in str(info.value)
    assert capsys.readouterr().err == ""       # no usage block above the one-line error
