"""Hugging Face: safeckpt.hf.Trainer checkpoints, exact resume after SIGKILL, fallback past a damaged
newest checkpoint, export to from_pretrained, conversion of stock Trainer folders."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
import hf_train  # noqa: E402
import torch  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt.cli import main  # noqa: E402
from safeckpt.hf import SUPPORTED_TRANSFORMERS, Trainer, export_hf, import_hf_checkpoint  # noqa: E402

CHILD = Path(hf_train.__file__)


def read_losses(path: Path) -> dict[int, str]:
    losses: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        assert losses.setdefault(int(step), loss) == loss, f"step {step} trained twice with different losses"
    return losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    tmp = tmp_path_factory.mktemp("hf_uninterrupted")
    hf_train.main([str(tmp / "out"), str(tmp / "losses.txt")])  # in this process: saves an import
    losses = read_losses(tmp / "losses.txt")
    assert sorted(losses) == list(range(1, hf_train.STEPS + 1))
    return losses


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run SIGKILLed once checkpoint-8 is committed, then resumed in a new process (with every
    unpickler booby-trapped) with resume_from_checkpoint=True; returns (output_dir, losses)."""
    tmp = tmp_path_factory.mktemp("hf_resumed")
    out, losses = tmp / "out", tmp / "losses.txt"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(out), str(losses), "--block-at", "10"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while not (out / "checkpoint-8" / "manifest.json").is_file():
            assert child.poll() is None, child.stderr.read().decode()[-3000:] if child.stderr else ""
            time.sleep(0.02)
        child.kill()  # SIGKILL
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stderr):
            if stream:
                stream.close()
    done = subprocess.run(
        [sys.executable, str(CHILD), str(out), str(losses), "--resume", "--trap-unpickling"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, losses


def test_killed_run_resumes_exactly(uninterrupted: dict[int, str], resumed_run: tuple[Path, Path]) -> None:
    out, losses = resumed_run
    assert read_losses(losses) == uninterrupted
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoint-12", "checkpoint-8"]


def test_checkpoint_folders_are_safeckpt_checkpoints(resumed_run: tuple[Path, Path]) -> None:
    folder = resumed_run[0] / "checkpoint-12"
    manifest = safeckpt.verify_checkpoint(folder)
    listed = {entry.name for entry in manifest.files}
    assert "trainer_state.json" in listed and "config.json" in listed  # verified with the rest
    assert not [p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin")], "nothing pickled"
    state = transformers.TrainerState.load_from_json(str(folder / "trainer_state.json"))
    assert state.global_step == 12
    ckpt = safeckpt.load_checkpoint(folder, restore_rng=False)
    assert ckpt.step == 12 and ckpt.config["model_type"] == "gpt2"
    assert transformers.GPT2Config(**{k: v for k, v in ckpt.config.items() if k != "model_type"}).n_embd == 16
    assert ckpt.optimizer_state is not None and ckpt.scheduler_state is not None and ckpt.rng_state is not None


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(
    uninterrupted: dict[int, str], resumed_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shutil.copytree(resumed_run[0], out)
    with open(out / "checkpoint-12" / "optimizer.safetensors", "r+b") as file:
        file.seek(-3, os.SEEK_END)
        byte = file.read(1)
        file.seek(-3, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0x40]))
    (out / "checkpoint-16").mkdir()  # a stock or unfinished folder: no manifest
    trainer = hf_train.make_trainer(str(out), str(tmp_path / "losses.txt"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called while resuming"))
    with pytest.warns(safeckpt.CheckpointFallbackWarning) as caught:
        trainer.train(resume_from_checkpoint=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "checkpoint-16" in messages and "checkpoint-12" in messages and "resuming from" in messages
    assert "checkpoint-8" in messages
    resumed = read_losses(tmp_path / "losses.txt")
    assert resumed == {step: uninterrupted[step] for step in range(9, hf_train.STEPS + 1)}


def test_export_hf_loads_with_from_pretrained_and_identical_logits(
    resumed_run: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = resumed_run[0] / "checkpoint-12"
    exported = export_hf(folder, tmp_path / "hf")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    original = transformers.GPT2LMHeadModel(hf_train.tiny_config()).eval()
    safeckpt.load_checkpoint(folder, model=original, restore_rng=False)
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


def test_export_hf_from_a_saved_transformers_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_train.tiny_config()).eval()
    path = safeckpt.save_checkpoint(model, None, model.config, None, 1, directory=tmp_path / "run")
    out = export_hf(path, tmp_path / "hf")  # model_type comes from the manifest metadata
    tokens = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
        assert torch.equal(logits, model(tokens).logits)
    plain = safeckpt.save_checkpoint(model, None, {"n_embd": 16}, None, 2, directory=tmp_path / "run")
    with pytest.raises(safeckpt.UnsupportedValueError, match="model_type="):
        export_hf(plain, tmp_path / "hf2")
    with pytest.raises(safeckpt.CheckpointExistsError, match="overwrite=True"):
        export_hf(path, out)
    assert export_hf(path, out, overwrite=True) == out
    assert main(["export", str(path), str(out), "--to", "hf"]) == 1  # the CLI refuses an existing OUT
    assert main(["export", str(path), str(tmp_path / "cli"), "--to", "hf"]) == 0
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cli").eval()(tokens).logits
        assert torch.equal(logits, model(tokens).logits)


def test_stock_trainer_folder_converts_and_resumes_exactly(
    uninterrupted: dict[int, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class StopAt4(transformers.TrainerCallback):
        def on_step_end(self, args: object, state: transformers.TrainerState, control: object, **kw: object) -> None:
            if state.global_step == 4:
                control.should_training_stop = True  # type: ignore[attr-defined]

    stock = hf_train.make_trainer(str(tmp_path / "stock"), str(tmp_path / "stock.txt"), base=transformers.Trainer)
    stock.add_callback(StopAt4())
    stock.train()
    assert (tmp_path / "stock" / "checkpoint-4" / "optimizer.pt").is_file()
    with pytest.warns(UserWarning, match="training_args.bin: skipped"):  # `safeckpt convert FOLDER ROOT`
        assert main(["convert", str(tmp_path / "stock" / "checkpoint-4"), str(tmp_path / "safe")]) == 0
    converted = tmp_path / "safe" / "checkpoint-4"
    capsys.readouterr()
    # Into its own folder: refused before reading, the stock folder kept.
    assert main(["convert", str(tmp_path / "stock" / "checkpoint-4"), str(tmp_path / "stock"), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "is a folder of other files, not a checkpoint" in err and "even with --overwrite" in err, err
    assert (tmp_path / "stock" / "checkpoint-4" / "optimizer.pt").is_file()
    ckpt = safeckpt.load_checkpoint(converted, restore_rng=False)
    assert ckpt.step == 4 and ckpt.rng_state is not None and ckpt.config["model_type"] == "gpt2"
    trainer = hf_train.make_trainer(str(tmp_path / "safe"), str(tmp_path / "resumed.txt"))
    trainer.train(resume_from_checkpoint=True)
    assert read_losses(tmp_path / "resumed.txt") == {s: uninterrupted[s] for s in range(5, hf_train.STEPS + 1)}


class Opaque:
    """Not something torch.load(weights_only=True) may build."""


def test_convert_refuses_files_that_need_unpickling(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    transformers.GPT2LMHeadModel(hf_train.tiny_config()).save_pretrained(folder)
    torch.save({"state": {}, "param_groups": [], "hook": Opaque()}, folder / "optimizer.pt")
    with pytest.raises(safeckpt.UnsupportedValueError) as info:
        import_hf_checkpoint(folder, tmp_path / "out")
    assert "optimizer.pt" in str(info.value) and "weights_only=True" in str(info.value)
    assert not (tmp_path / "out").exists()


def _checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_best_checkpoint_is_the_one_just_saved_when_it_is_the_best(tmp_path: Path) -> None:
    """As with the stock Trainer: the save that sets a new best metric is recorded as the best
    checkpoint at once (in trainer_state.json too), kept by rotation and loaded at the end."""
    scores = iter([0.5, 0.3, 0.9])  # evaluations at steps 4, 8, 12: the last is the best
    trainer = hf_train.make_trainer(
        str(tmp_path / "out"), str(tmp_path / "losses.txt"),
        args={"eval_strategy": "steps", "eval_steps": 4, "load_best_model_at_end": True, "save_total_limit": 1,
              "metric_for_best_model": "score", "greater_is_better": True},
        eval_dataset=hf_train.dataset()[:8], compute_metrics=lambda _: {"score": next(scores)},
    )  # fmt: skip
    trainer.train()
    best = tmp_path / "out" / "checkpoint-12"
    assert trainer.state.best_model_checkpoint == str(best)
    assert _checkpoints(tmp_path / "out") == ["checkpoint-12"]
    saved = safeckpt.load_checkpoint(best, restore_rng=False)
    assert json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"] == str(best)
    assert all(torch.equal(saved.model_state[k], v) for k, v in trainer.model.state_dict().items())


def test_rotation_keeps_the_new_save_beside_an_earlier_runs_later_steps(tmp_path: Path) -> None:
    """save_total_limit keeps the checkpoint just written even when output_dir holds an earlier
    run's higher-numbered ones (ordered by time written, as the stock Trainer orders them)."""
    out = tmp_path / "out"
    hf_train.make_trainer(str(out), str(tmp_path / "a.txt")).train()  # leaves checkpoint-8 and -12
    earlier = time.time() - 60
    for name in ("checkpoint-8", "checkpoint-12"):
        os.utime(out / name, (earlier, earlier))
    hf_train.make_trainer(str(out), str(tmp_path / "b.txt"), steps=4).train()
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-12"]


def test_checkpoint_holds_what_from_pretrained_reads(tmp_path: Path) -> None:
    """Like a stock checkpoint-N: config.json names the architecture and dtype, and the
    tokenizer and generation config are saved beside it (listed in the manifest, verified)."""
    tokenizers = pytest.importorskip("tokenizers")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w63"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w63", pad_token="w0")
    out = tmp_path / "out"
    hf_train.make_trainer(str(out), str(tmp_path / "losses.txt"), steps=4, processing_class=tokenizer).train()
    folder = out / "checkpoint-4"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    listed = set(json.loads((folder / "manifest.json").read_text())["files"])
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= listed
    safeckpt.verify_checkpoint(folder)
    assert transformers.AutoTokenizer.from_pretrained(folder)("w5 w7")["input_ids"] == [5, 7]
    assert transformers.AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id == 0


# The transformers.Trainer internals safeckpt.hf.Trainer overrides or calls: if an upgrade renames
# or re-signs one of them, this fails instead of the Trainer silently writing pickled checkpoints.
PRIVATE_API = {
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_load_scaler": ["self", "checkpoint"],
    "_load_rng_state": ["self", "checkpoint"],
    "_load_best_model": ["self"],
    "_get_output_dir": ["self", "trial"],
    "_push_from_checkpoint": ["self", "checkpoint_folder"],
    "store_flos": ["self"],
}


@pytest.mark.parametrize("name", sorted(PRIVATE_API))
def test_trainer_internals_we_rely_on_are_unchanged(name: str) -> None:
    method = getattr(transformers.Trainer, name)
    assert list(inspect.signature(method).parameters) == PRIVATE_API[name]
    source = inspect.getsource(transformers.Trainer)
    if name.startswith("_load"):
        assert f"self.{name}(" in source, f"transformers.Trainer no longer calls {name}"
    assert name in Trainer.__dict__ or name in ("_get_output_dir", "_push_from_checkpoint", "store_flos")


def test_supported_version_range_covers_the_installed_transformers() -> None:
    found = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert SUPPORTED_TRANSFORMERS[0] <= found < SUPPORTED_TRANSFORMERS[1]
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    low, high = SUPPORTED_TRANSFORMERS
    assert f'"transformers>={low[0]}.{low[1]},<{high[0]}"' in pyproject
    # train() reads trainer_state.json right after _load_from_checkpoint, which verified it.
    stock_train = inspect.getsource(transformers.Trainer.train)
    assert stock_train.index("self._load_from_checkpoint(resume_from_checkpoint)") < stock_train.index(
        "TrainerState.load_from_json"
    )


def test_trainer_refuses_an_output_dir_url_before_training(tmp_path: Path) -> None:
    """The Trainer writes logs, the model card and its own files under output_dir with local file
    calls, so a bucket URL would end up as a local folder named 's3:'; refused at construction."""
    model = transformers.GPT2LMHeadModel(hf_train.tiny_config())
    args = transformers.TrainingArguments(output_dir="s3://bucket/run", report_to=[], use_cpu=True)
    with pytest.raises(safeckpt.CheckpointUsageError, match="s3://bucket/run: safeckpt.hf.Trainer needs a local output_dir"):
        Trainer(model=model, args=args)
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
