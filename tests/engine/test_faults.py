"""Nothing lost, nothing silently wrong: a kill before the first checkpoint, a damaged newest
checkpoint, a half-written log line, a run directory used twice, a damaged recipe and a
malformed upload each end in the uninterrupted run's adapter or a one-line error."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fedllm.engine as engine
import fedllm.state as state_module
from fedllm.cli import main
from fedllm.codecs.base import Codec
from fedllm.engine import resume_run, run_recipe
from fedllm.fleet import LocalFleet
from fedllm.metrics import MetricsLog
from fedllm.registry import CODECS
from fedllm.wire import Message

STATEFUL = dict(  # per-client moments spilled to disk at once, and server moments: the state a kill can leak
    federation={"rounds": 3, "num_clients": 4, "clients_per_round": 2, "client_store_budget_mb": 0.0},
    client={"max_steps": 2, "keep_optimizer_state": True},
    strategy={"name": "fedadam", "server_lr": 0.01},
)


def final_adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rounds(run_dir):
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def reference(recipe_file):
    path = recipe_file(**STATEFUL, output={"name": "reference", "checkpoint_every": 0})
    return path, final_adapter(run_recipe(str(path)))


def test_a_kill_before_the_first_checkpoint_resumes_to_the_uninterrupted_adapter(reference, monkeypatch, tmp_path):
    path, expected = reference

    def killed(self, rounds_done):  # the process dies as it is about to write its first checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Federation, "checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(str(path), ["output.name=killed"])
    run_dir = tmp_path / "runs" / "killed"
    assert any((run_dir / "client_store").iterdir()) and rounds(run_dir) == [1, 2, 3]  # what the attempt left
    monkeypatch.undo()
    resume_run(str(run_dir))
    assert same(final_adapter(run_dir), expected)
    assert rounds(run_dir) == [1, 2, 3]  # the killed attempt's rows are gone, none logged twice


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, tmp_path, caplog):
    path, expected = reference
    run_dir = run_recipe(str(path), ["output.name=damaged", "output.checkpoint_every=1", "output.keep_last=3"])
    newest = run_dir / "checkpoints" / "round_3" / "global.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit of a weight: still loads, silently wrong without the manifest
    newest.write_bytes(bytes(data))
    shutil.rmtree(run_dir / "final")
    resume_run(str(run_dir))
    assert "round_3 is damaged" in caplog.text and "does not match its manifest" in caplog.text
    assert same(final_adapter(run_dir), expected)
    assert rounds(run_dir) == [1, 2, 3]


def test_a_missing_client_file_is_damage_not_a_reset(reference, tmp_path, caplog):
    path, expected = reference
    run_dir = run_recipe(str(path), ["output.name=missing", "output.checkpoint_every=1", "output.keep_last=3"])
    next((run_dir / "checkpoints" / "round_3" / "clients").glob("client_*.safetensors")).unlink()
    shutil.rmtree(run_dir / "final")
    resume_run(str(run_dir))
    assert "file(s) missing" in caplog.text
    assert same(final_adapter(run_dir), expected)


def test_no_intact_checkpoint_is_a_one_line_error_naming_a_command_that_works(recipe_file, capsys):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 1})))
    (run_dir / "checkpoints" / "round_1" / "global.safetensors").write_bytes(b"not a tensor file")
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err
    command = err.split("`")[1].split()  # before: `fedllm run`, which refuses that directory and points back
    assert command[:2] == ["fedllm", "run"] and main(command[1:]) == 0
    assert (run_dir.parent / f"{run_dir.name}-new" / "final").is_dir()


def test_a_checkpoint_claiming_a_round_past_the_run_is_damage(reference, caplog):
    from fedllm.state import file_digest

    path, expected = reference
    run_dir = run_recipe(str(path), ["output.name=far", "output.checkpoint_every=1", "output.keep_last=3"])
    newest = run_dir / "checkpoints" / "round_3"
    (newest / "meta.json").write_text(json.dumps({"round": 1_000_000, "saved_at": 0.0}))
    manifest = json.loads((newest / "manifest.json").read_text())  # recomputed: the manifest vouches for it
    manifest["meta.json"] = {"bytes": (newest / "meta.json").stat().st_size, "sha256": file_digest(newest / "meta.json")}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run_dir / "final")
    resume_run(str(run_dir))  # before: "finished" at once and exported the adapter of round 3 as if of round 10^6
    assert "round_3 is damaged: its round 1000000 is not one of this run's rounds 1..3" in caplog.text
    assert same(final_adapter(run_dir), expected) and rounds(run_dir) == [1, 2, 3]


def test_a_half_written_last_log_line_is_dropped_on_resume(reference, tmp_path, caplog):
    path, expected = reference
    run_dir = run_recipe(str(path), ["output.name=cut", "output.checkpoint_every=1"])
    shutil.rmtree(run_dir / "checkpoints" / "round_3")
    shutil.rmtree(run_dir / "final")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train_lo')  # killed mid-write
    resume_run(str(run_dir))
    assert same(final_adapter(run_dir), expected) and rounds(run_dir) == [1, 2, 3]


def test_running_into_an_existing_run_directory_refuses(recipe_file, capsys):
    path = recipe_file(federation={"rounds": 1})
    run_recipe(str(path))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "fedllm resume" in err and "output.name" in err


@pytest.mark.parametrize("text", ["", "seed: 0\nmodel:\n  name: tiny-", "seed: [unclosed"])
def test_an_empty_or_cut_recipe_in_a_run_directory_is_an_error(recipe_file, capsys, text):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 1})))
    (run_dir / "recipe.yaml").write_text(text)
    assert main(["resume", str(run_dir)]) == 2
    assert "recipe.yaml is damaged" in capsys.readouterr().err


MALFORMED_CLIENT = 1


@CODECS.register("test_reshape_for_client_1")
class ReshapeForClient1(Codec):
    """Test codec: client 1's upload arrives with every tensor flattened (wrong shapes)."""

    def encode(self, message: Message, ctx) -> Message:
        return message

    def decode(self, message: Message, ctx) -> Message:
        if ctx.client_id != MALFORMED_CLIENT:
            return message
        return Message({k: t.reshape(-1) for k, t in message.tensors.items()}, message.meta)


def test_a_malformed_upload_is_rejected_and_the_round_goes_on(recipe_file, caplog):
    path = recipe_file(federation={"rounds": 2, "num_clients": 3, "clients_per_round": 3},
                       codecs=[{"name": "test_reshape_for_client_1"}])
    run_dir = run_recipe(str(path))
    assert f"client {MALFORMED_CLIENT} sent a malformed update" in caplog.text and "has shape" in caplog.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [1, 1] and all(torch.isfinite(t).all() for t in final_adapter(run_dir).values())
    assert [r["rejected"] for r in rows] == [{"malformed": [MALFORMED_CLIENT]}] * 2  # how many, why, who


def test_fedavg_with_an_inf_attacker_keeps_a_finite_global(recipe_file, caplog):
    path = recipe_file(federation={"rounds": 2, "num_clients": 4, "clients_per_round": 4},
                       byzantine={"name": "large_norm", "count": 1, "scale": float("inf")})
    run_dir = run_recipe(str(path))
    assert all(torch.isfinite(t).all() for t in final_adapter(run_dir).values())
    assert "forged update(s) were non-finite and dropped" in caplog.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    attackers = json.loads((run_dir / "run_meta.json").read_text())["byzantine_clients"]
    assert len(attackers) == 1 and [r["attackers"] for r in rows] == [attackers] * 2
    assert [r["rejected"] for r in rows] == [{"non_finite": attackers}] * 2 and [r["dropped"] for r in rows] == [1, 1]


@CODECS.register("test_garbage_for_client_2")
class GarbageForClient2(Codec):
    """Test codec: client 2's upload arrives as bytes no codec can read."""

    def encode(self, message: Message, ctx) -> Message:
        if ctx.client_id != 2:
            return message
        return Message({"fedzip": torch.full((64,), 255, dtype=torch.uint8)}, message.meta)

    def decode(self, message: Message, ctx) -> Message:
        if ctx.client_id != 2:
            return message
        return CODECS.build({"name": "fedzip"}).decode(message, ctx)  # refuses the crafted payload


def test_an_undecodable_upload_is_rejected_with_its_bytes_counted(recipe_file, caplog):
    path = recipe_file(federation={"rounds": 1, "num_clients": 3, "clients_per_round": 3},
                       codecs=[{"name": "test_garbage_for_client_2"}])
    run_dir = run_recipe(str(path))
    assert "client 2 sent a malformed update" in caplog.text
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert next(e for e in ledger if e["client"] == 2)["bytes_up"] > 64
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["dropped"] == 1


def killer(when):
    """A wrapper that lets the wrapped call happen, then 'kills' the process (KeyboardInterrupt
    leaves the disk exactly as SIGKILL would: nothing after it runs) when `when(*args)` holds."""
    def wrap(real):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            if when(*args):
                raise KeyboardInterrupt
            return result
        return wrapped
    return wrap


def in_second_checkpoint(path):
    return ".tmp_round_2" in str(path)


CHECKPOINT_STAGES = {  # function of fedllm.state -> when the kill lands, during the write of round_2
    "after its first part": ("save_state", lambda state, path, *a, **k: in_second_checkpoint(path)),
    "after its first client file": ("link_or_copy", lambda source, target: in_second_checkpoint(target)),
    "after its manifest, before the rename": ("write_text", lambda path, text: in_second_checkpoint(path)
                                              and path.name == "manifest.json"),
    "after the rename, mid-delete of the old one": ("retire", lambda path: path.name == "round_1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", CHECKPOINT_STAGES)
def test_a_kill_at_each_stage_of_a_checkpoint_write_resumes_bit_exactly(reference, monkeypatch, stage):
    path, expected = reference
    name, when = CHECKPOINT_STAGES[stage]
    monkeypatch.setattr(state_module, name, killer(when)(getattr(state_module, name)))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(str(path), ["output.name=killed", "output.checkpoint_every=1", "output.keep_last=1"])
    monkeypatch.undo()
    run_dir = path.parent / "runs" / "killed"
    resume_run(str(run_dir))
    assert same(final_adapter(run_dir), expected)
    assert rounds(run_dir) == [1, 2, 3]


FIRST_ROUND_STAGES = {  # (class, method) -> when the kill lands, all before the first checkpoint
    "after the run directory is set up": (engine.Federation, "start", lambda self: True),
    "after the first client's state is stored": (LocalFleet, "keep_record", lambda self, *a: True),
    "after the round is aggregated": (engine.Federation, "run_round", lambda self, *a, **k: True),
    "after the round is logged": (MetricsLog, "log_round", lambda self, *a: True),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", FIRST_ROUND_STAGES)
def test_a_kill_at_each_stage_of_the_first_round_resumes_bit_exactly(reference, monkeypatch, stage):
    path, expected = reference
    owner, name, when = FIRST_ROUND_STAGES[stage]
    monkeypatch.setattr(owner, name, killer(when)(getattr(owner, name)))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(str(path), ["output.name=killed"])
    monkeypatch.undo()
    run_dir = path.parent / "runs" / "killed"
    assert not list((run_dir / "checkpoints").glob("round_*"))
    resume_run(str(run_dir))
    assert same(final_adapter(run_dir), expected)
    assert rounds(run_dir) == [1, 2, 3]


@pytest.mark.parametrize("planted", ["metrics.jsonl", "checkpoints", "client_store"])
def test_a_symbolic_link_planted_in_a_run_directory_is_refused_not_written_through(recipe_file, tmp_path, capsys, planted):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 1})))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("untouched")
    target = run_dir / planted
    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    target.symlink_to(victim / "precious.txt" if planted.endswith(".jsonl") else victim)
    for argv in (["resume", str(run_dir)], ["plot", str(run_dir)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a symbolic link" in err and "Traceback" not in err, (argv, err)
    main(["export", str(run_dir), str(tmp_path / "out")])  # reads the run, writes only to out/
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"] and (victim / "precious.txt").read_text() == "untouched"


def test_a_planted_link_in_the_tmp_name_of_an_atomic_write_is_not_followed(tmp_path):
    from fedllm.metrics import write_atomically

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (tmp_path / ".recipe.yaml.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomically(tmp_path / "recipe.yaml", "x: 1\n")
    assert victim.read_text() == "untouched"


def test_export_of_a_damaged_checkpoint_is_a_one_line_error(recipe_file, tmp_path, capsys):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 1})))
    weights = run_dir / "checkpoints" / "round_1" / "global.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "round_1 is damaged" in err and "does not match its manifest" in err and not (tmp_path / "out").exists()


def test_a_full_disk_during_a_checkpoint_names_the_directory_the_size_and_the_fix(recipe_file, monkeypatch, capsys):
    import errno

    real = state_module.save_state

    def full_disk(state, path, *args, **kwargs):
        if in_second_checkpoint(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(state_module, "save_state", full_disk)
    assert main(["run", str(recipe_file(federation={"rounds": 2}))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "checkpoints for the checkpoint of round 2 (the last one wrote" in err and "fedllm resume" in err


def test_a_full_disk_at_the_first_checkpoint_does_not_claim_a_last_one(recipe_file, monkeypatch, capsys):
    import errno

    def full_disk(state, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state_module, "save_state", full_disk)
    assert main(["run", str(recipe_file(federation={"rounds": 1}))]) == 2
    err = capsys.readouterr().err.strip()
    assert "for the checkpoint of round 1 (its first)" in err and "the last one wrote" not in err  # before: "wrote 0 bytes"
