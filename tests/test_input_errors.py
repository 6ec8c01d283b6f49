"""Input mistakes answered with one line naming what is wrong, before anything loads or is written."""
import json
import shutil

import pytest

from exgrpo.cli import main as cli_main
from exgrpo.models import ModelError, check_model_dir
from tests.test_trainer import small_train


def test_a_config_folder_is_named(tmp_path, capsys):
    assert cli_main(["probe", "--config", str(tmp_path)]) == 2
    assert f"--config {tmp_path} is a folder; give a JSON or TOML file" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_bytes(b'{"task": "caf\xe9"}')
    assert cli_main(["probe", "--config", str(bad)]) == 2
    assert "c.json: not UTF-8 text (byte 0xe9" in capsys.readouterr().err


def test_a_truncated_safetensors_file_is_named_before_loading(tiny_student, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_student, copy)
    w = next(copy.glob("*.safetensors"))
    check_model_dir(copy)
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"model\.safetensors is damaged \(\d+ bytes, but its tensors need \d+ "
                                         r"\(truncated\)\); copy or download it again"):
        check_model_dir(copy)
    w.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="its header claims"):
        check_model_dir(copy)


def test_zero_counts_are_refused(tiny_student, probe_dir, tmp_path):
    from exgrpo.train import train
    for name in ("k_probes", "max_new_tokens", "keep_checkpoints"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            train(small_train(tiny_student, probe_dir, tmp_path / name, **{name: 0}))
        assert not (tmp_path / name).exists()


HTTP = ["probe", "--task", "gsm8k", "--teacher", "http", "--teacher-model", "m", "--limit", "1", "--no-progress"]


@pytest.mark.parametrize("flags,message", [
    (["--api-key-env", "sk-abc123secret"], "must be the NAME of the environment variable"),
    (["--api-key-env", "EXGRPO_TEST_SURELY_UNSET"], "EXGRPO_TEST_SURELY_UNSET: that environment variable is not set"),
    (["--base-url", "http://user:sk-abc@127.0.0.1:9/v1"], "--base-url carries a credential"),
    (["--base-url", "http://127.0.0.1:9/v1?api_key=sk-abc"], "--base-url carries a credential"),
])
def test_secrets_are_never_taken_in_a_flag(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EXGRPO_TEST_SURELY_UNSET", raising=False)
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    out = tmp_path / "o"
    assert cli_main([*HTTP, "--data", str(data), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "sk-abc" not in err
    assert not (out / "config.json").exists()


def test_eval_checks_its_report_path_before_computing(tmp_path, capsys, monkeypatch):
    import exgrpo.evaluate as ev
    monkeypatch.setattr(ev, "load_chat_model", lambda *a, **k: pytest.fail("computed before checking --out"))
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path, "is a folder; give the report's file name"),
                         (tmp_path / "afile" / "r.json", "cannot be written")):
        assert cli_main(["eval", "--model", str(tmp_path), "--out", str(out), "--n", "2"]) == 2
        assert message in capsys.readouterr().err


def test_an_input_error_is_one_line_and_debug_adds_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert cli_main(["data", "gsm8k", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exgrpo data:" in err and "nowhere.jsonl" in err and "Traceback" not in err
    for argv in (["--debug", "data", "gsm8k", str(missing)], ["data", "gsm8k", str(missing), "--debug"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("exgrpo data:") and "Traceback (most recent call last)" in err


def test_an_unexpected_read_error_is_caught_by_the_cli(tmp_path, capsys, monkeypatch):
    import exgrpo.cli.data as data_cli

    def broken(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "f.jsonl"))
    monkeypatch.setattr(data_cli, "run", broken)
    assert cli_main(["data", "gsm8k", "x"]) == 2
    assert capsys.readouterr().err == f"exgrpo data: {tmp_path / 'f.jsonl'}: Permission denied\n"
    monkeypatch.setattr(data_cli, "run", lambda args: [][1])               # a bug keeps its traceback
    with pytest.raises(IndexError):
        cli_main(["data", "gsm8k", "x"])


def test_an_encoder_config_is_refused_before_loading(tiny_student, tmp_path, monkeypatch):
    import transformers
    copy = tmp_path / "bert"
    shutil.copytree(tiny_student, copy)
    (copy / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded before the family was checked"))
    with pytest.raises(ModelError, match=r"config\.json: model_type 'bert' is an encoder; exgrpo trains and "
                                         r"samples decoder-only chat models"):
        check_model_dir(copy)
    (copy / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(ModelError, match="names no model_type"):
        check_model_dir(copy)


def test_a_config_from_another_model_over_the_weights_is_refused(tiny_student, tmp_path):
    from exgrpo.models import init_student
    copy = tmp_path / "llama"
    shutil.copytree(tiny_student, copy)
    gemma = json.loads((copy / "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
            "vocab_size", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    llama = {k: gemma[k] for k in keep if k in gemma} | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (copy / "config.json").write_text(json.dumps(llama))          # untied: it needs an lm_head the files lack
    with pytest.raises(ModelError, match=r"the weights do not fit config\.json \(model_type 'llama'\): 1 "
                                         r"tensor\(s\) missing from the weight files \(lm_head\.weight\)"):
        init_student(copy, device="cpu")
    (copy / "config.json").write_text(json.dumps(gemma | {"intermediate_size": gemma["intermediate_size"] * 2}))
    with pytest.raises(ModelError, match=r"of another shape \(model\.layers\.0\.mlp\."):
        init_student(copy, device="cpu")
