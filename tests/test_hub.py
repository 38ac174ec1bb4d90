"""mopoe.hub on real tiny runs of the stand-in MNIST-SVHN-Text: `mopoe-export` writes a folder without pickle (every
file opened as what it claims to be), `from_pretrained` gives the run's model bit for bit (parameters, buffers, the
objective's parameters, seeded generations), config.json and the model card say what they must, crafted folders are
refused naming the file and key with nothing executed, the hub's pull path runs for real offline on a hub cache, and
the push path is followed up to the huggingface_hub call (nothing here reaches the real hub)."""
import builtins
import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import huggingface_hub
import pytest
import safetensors
import safetensors.torch as st
import torch
import yaml
from torch.utils.data import default_collate

import mopoe.io
from mopoe.hub import (
    CARD_NAME,
    CONFIG_NAME,
    MODEL_OPTIONS,
    PRETRAINED_FILES,
    RESULTS_NAME,
    WEIGHTS_NAME,
    PretrainedError,
    from_pretrained,
    hub_cache_entry,
    load_pretrained,
    main_export,
    push_to_hub,
    save_pretrained,
)
from mopoe.io import DiskFullError
from mopoe.train import BUILD_OPTIONS, coerce_option, config_key, load_run, resolve_config, run, saved_config

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUNS = {"mopoe": {}, "mmvaeplus": dict(objective="mmvaeplus", private_dim=4, objective_options="K=2")}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    "Tiny runs (1 epoch, 64 tuples): MoPoE, and MMVAE+ (the objective's own parameters, private latents, options)."
    root = tmp_path_factory.mktemp("hub_runs")
    return {name: run(resolve_config(epochs=1, num_train=64, num_test=64, metrics="latent", device="cpu", seed=0,
                                     out_dir=str(root / name), data_dir=str(data_dir), **extra), progress=False)
            for name, extra in RUNS.items()}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    "The MoPoE run exported by the installed `mopoe-export` command: (folder, the command's result)."
    out = tmp_path_factory.mktemp("exports") / "mopoe"
    p = subprocess.run([str(BIN / "mopoe-export"), runs["mopoe"]["out_dir"], str(out)], capture_output=True, text=True,
                       env=ENV, timeout=300)
    return out, p


class Evil:
    "A pickle whose unpickling would create `marker`: it must never appear."
    marker = None
    def __reduce__(self): return (builtins.open, (str(Evil.marker), "w"))


@pytest.fixture
def marker(tmp_path):
    Evil.marker = tmp_path / "EXECUTED"
    yield Evil.marker
    assert not Evil.marker.exists(), "a crafted pickle was executed"


def _batch(res, n=8):
    x, _ = default_collate([res["data"][1][i] for i in range(n)])
    return x


def _equal_models(a, b):
    for get in ("named_parameters", "named_buffers"):                        # buffers: the non-persistent ones too
        ta, tb = dict(getattr(a, get)()), dict(getattr(b, get)())
        assert sorted(ta) == sorted(tb), get
        for k in ta: assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_export_command_writes_a_folder_without_pickle(exported, runs):
    out, p = exported
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("STAND-IN DATA: mnist_svhn_text") and lines[1].startswith(f"wrote {out}: "), p.stdout
    assert sorted(f.name for f in out.iterdir()) == sorted(PRETRAINED_FILES)
    assert [f.name for f in out.parent.iterdir()] == ["mopoe"]                  # no temporary folder left beside it
    for f in out.iterdir():                                                  # every file opened as what it is
        raw = f.read_bytes()
        if f.suffix == ".json": assert isinstance(json.loads(raw), dict)
        elif f.name == WEIGHTS_NAME:
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            assert 8 + n + max(ends) == len(raw)                              # header + raw tensor bytes, nothing else
            assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
            with safetensors.safe_open(f, "pt") as s: assert set(s.keys()) == set(runs["mopoe"]["model"].state_dict())
        else:
            assert f.name == CARD_NAME and raw.decode().startswith("---\n")
            assert yaml.safe_load(raw.decode().split("---\n")[1])["library_name"] == "mopoe"
    assert not any(f.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt") for f in out.iterdir())


@pytest.mark.parametrize("name", list(RUNS))
def test_loaded_model_equals_the_run_bitwise(name, runs, tmp_path):
    res = runs[name]
    out = save_pretrained(res["out_dir"], tmp_path / "m")
    saved, loaded = load_run(res["out_dir"]).model, from_pretrained(out)
    _equal_models(saved, loaded)
    _equal_models(res["model"].eval(), loaded)
    assert not loaded.training
    own = [k for k, _ in loaded.named_parameters() if k.startswith("objective.")]
    assert bool(own) == (name == "mmvaeplus"), own                          # MMVAE+'s own parameters travel too
    x = _batch(res)
    outputs = []
    for model in (saved, loaded):
        torch.manual_seed(7); g = model.generate(6)
        torch.manual_seed(7); c = model.cond_generate({"mnist": x["mnist"]})
        outputs.append({**{f"g_{m}": t for m, t in g.items()}, **{f"c_{m}": t for m, t in c.items()}})
    assert outputs[0].keys() == outputs[1].keys()
    for k in outputs[0]: assert torch.equal(outputs[0][k], outputs[1][k]), k


def test_config_json_holds_every_build_option_and_the_dataset(exported, runs):
    meta = json.loads((exported[0] / CONFIG_NAME).read_text())
    state = load_run(runs["mopoe"]["out_dir"]).state
    assert set(BUILD_OPTIONS) | {"objective_options"} <= set(meta["build_options"]) == set(MODEL_OPTIONS)
    for k, v in meta["build_options"].items(): assert v == state["config"][k], k
    assert meta["config"] == asdict(saved_config(state))
    assert meta["info"] == state["info"]
    assert meta["architecture"] == "MultimodalVAE" and meta["library_name"] == "mopoe"
    raw = (exported[0] / WEIGHTS_NAME).read_bytes()
    assert meta["weights"]["sha256"] == hashlib.sha256(raw).hexdigest() and meta["weights"]["bytes"] == len(raw)
    assert meta["trained"]["epoch"] == state["epoch"] == 1


def test_model_card_has_the_header_the_provenance_first_and_the_exact_command(exported, runs):
    text = (exported[0] / CARD_NAME).read_text()
    _, head, body = text.split("---\n", 2)
    meta, results = yaml.safe_load(head), json.loads(Path(runs["mopoe"]["out_dir"], "results.json").read_text())
    assert meta["library_name"] == "mopoe" and meta["datasets"] == ["mnist_svhn_text"]
    assert {"mopoe", "mnist_svhn_text", "stand-in-data"} <= set(meta["tags"])
    first = body.splitlines()[0]
    assert first == results["data"]["label"] and first.startswith("STAND-IN DATA: mnist_svhn_text"), first
    card_metrics = {m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    for k, v in results["metrics"]["latent"]["by_size"].items():
        assert card_metrics[f"latent accuracy, {k} modalit{'y' if k == '1' else 'ies'} given"] == v
    card = huggingface_hub.ModelCard.load(exported[0] / CARD_NAME)            # the hub's own reader
    assert card.data.library_name == "mopoe"
    assert (sorted(e.metric_value for e in card.data.eval_results)
            == sorted(results["metrics"]["latent"]["by_size"].values()))
    # the command, read back as mopoe-train would, gives the run's config option for option
    cmd = next(line for line in body.splitlines() if line.startswith("mopoe-train "))
    words = shlex.split(cmd)[1:]
    back = resolve_config({k[2:]: coerce_option(k[2:], v) for k, v in zip(words[::2], words[1::2], strict=True)})
    assert asdict(back) == asdict(runs["mopoe"]["config"])
    assert config_key(back) == results["config_key"]
    assert cmd in text and "papermill nbs/train.ipynb out.ipynb -p epochs 1" in text   # the run came from the notebook


def _copy(exported, tmp_path):
    d = tmp_path / "crafted"
    shutil.copytree(exported[0], d)
    return d


def _edit(key, value=None, drop=False):
    def f(d):
        m = json.loads((d / CONFIG_NAME).read_text())
        *path, last = key.split(".")
        target = m
        for p in path: target = target[p]
        if drop: del target[last]
        else: target[last] = value
        (d / CONFIG_NAME).write_text(json.dumps(m))
    return f


def _weights(change, keep_record=False):
    "Rewrite model.safetensors through `change(tensors)`; unless keep_record, config.json's record follows it."
    def f(d):
        t = st.load_file(d / WEIGHTS_NAME)
        raw = change(t) if callable(change) else change
        raw = raw if isinstance(raw, bytes) else st.save(raw)
        (d / WEIGHTS_NAME).write_bytes(raw)
        if not keep_record:
            _edit("weights.sha256", hashlib.sha256(raw).hexdigest())(d); _edit("weights.bytes", len(raw))(d)
    return f


def _pickle_file(d):
    (d / WEIGHTS_NAME).write_bytes(pickle.dumps({"decoders.mnist.body.0.bias": Evil()}))


def _torch_zip(d):
    with open(d / WEIGHTS_NAME, "wb") as f: torch.save({"w": Evil()}, f)


def _truncated(d): (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-1000])


def _flipped(d):
    raw = bytearray((d / WEIGHTS_NAME).read_bytes()); raw[-5] ^= 0x04; (d / WEIGHTS_NAME).write_bytes(bytes(raw))


def _absent_with_a_pickle(d):
    (d / WEIGHTS_NAME).unlink(); (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))


def _dropped(t): return {k: v for k, v in t.items() if k != "encoders.text.mu.bias"}
def _extra(t): return {**t, "extra.weight": torch.zeros(3)}
def _reshaped(t): return {**t, "encoders.mnist.mu.bias": torch.zeros(21)}
def _float64(t): return {**t, "encoders.mnist.mu.bias": t["encoders.mnist.mu.bias"].double()}


def _bigger(d): _edit("build_options.latent_dim", 32)(d); _edit("config.latent_dim", 32)(d)
def _other_objective(d): _edit("build_options.objective", "evil")(d); _edit("config.objective", "evil")(d)


CRAFTED = {
    "a pickle in place of safetensors": (_pickle_file, "model.safetensors is a pickle (protocol"),
    "a torch.save zip in place of safetensors": (_torch_zip, "model.safetensors is a zip archive"),
    "truncated tensors": (_truncated, " bytes, config.json key 'weights.bytes' says "),
    "truncated tensors, the record made to agree": (_weights(lambda t: st.save(t)[:-1000]),
                                                    "model.safetensors is not a valid safetensors file"),
    "a flipped bit": (_flipped, "model.safetensors does not match config.json key 'weights.sha256'"),
    "a missing tensor": (_weights(_dropped), "model.safetensors lacks tensor 'encoders.text.mu.bias'"),
    "an extra tensor": (_weights(_extra), "model.safetensors holds tensor 'extra.weight'"),
    "a wrong shape": (_weights(_reshaped), "tensor 'encoders.mnist.mu.bias' has shape (21,), the model's is (20,)"),
    "a wrong dtype": (_weights(_float64),
                      "tensor 'encoders.mnist.mu.bias' is torch.float64, the model's is torch.float32"),
    "the weights absent": (_absent_with_a_pickle,
                           "model.safetensors does not exist: the saved model's weights are absent (the folder holds "
                           "pytorch_model.bin, which mopoe never loads"),
    "another architecture": (_edit("architecture", "MultiVaeJMVAE"),
                             "config.json: key 'architecture' names 'MultiVaeJMVAE'"),
    "another format": (_edit("format", "multivae/1"), "config.json: key 'format' is 'multivae/1'"),
    "config and build_options disagree": (_edit("config.latent_dim", 32), "key 'config.latent_dim' (32) and "
                                                                           "'build_options.latent_dim' (20) differ"),
    "another latent size, consistently": (_bigger, "tensor 'encoders.mnist.mu.weight' has shape (20, 400), the "
                                                   "model's is (32, 400)"),
    "an unknown objective": (_other_objective, "config.json: unknown objective 'evil'"),
    "no dataset description": (_edit("info", drop=True), "config.json: key 'info' is missing"),
    "config.json not JSON": (lambda d: (d / CONFIG_NAME).write_bytes(pickle.dumps(Evil())),
                             "config.json is not valid JSON"),
    "config.json absent": (lambda d: (d / CONFIG_NAME).unlink(), "config.json does not exist"),
    **{f"build option {k} missing": (_edit(f"build_options.{k}", drop=True), f"config.json: key 'build_options.{k}' is "
                                     "missing; the model cannot be rebuilt with certainty") for k in MODEL_OPTIONS},
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_folder_is_refused_naming_the_file_and_key(case, exported, tmp_path, marker):
    change, says = CRAFTED[case]
    d = _copy(exported, tmp_path)
    change(d)
    with pytest.raises(PretrainedError) as e: from_pretrained(d)
    assert says in str(e.value), str(e.value)
    assert str(d) in str(e.value)                                              # the folder's file is named


def test_missing_optional_packages_are_named_with_the_extra(exported, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)                 # a local folder needs no hub package
    _equal_models(from_pretrained(exported[0]), runs["mopoe"]["model"].eval())
    for call in (lambda: from_pretrained("org/name"), lambda: push_to_hub(exported[0], "org/name")):
        with pytest.raises(ImportError, match=r"optional package 'huggingface_hub'.*pip install \"mopoe\[hub\]\""):
            call()
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for call in (lambda: from_pretrained(exported[0]),
                 lambda: save_pretrained(runs["mopoe"]["out_dir"], tmp_path / "x")):
        with pytest.raises(ImportError, match=r"optional package 'safetensors'.*pip install \"mopoe\[hub\]\""): call()
    assert main_export([runs["mopoe"]["out_dir"], str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mopoe-export: error: save_pretrained needs the optional package 'safetensors'"), err
    assert err.count("\n") == 1 and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_refuses_a_used_out_dir_and_never_leaves_half_a_folder(runs, tmp_path, monkeypatch, capsys):
    src = runs["mopoe"]["out_dir"]
    (tmp_path / "full").mkdir(); (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main_export([src, str(tmp_path / "full")]) == 1
    assert "exists and is not empty; refusing to overwrite it" in capsys.readouterr().err
    assert [f.name for f in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert (tmp_path / "full/keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"): save_pretrained(src, tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    assert main_export([src, str(tmp_path / "empty")]) == 0 and (tmp_path / "empty" / WEIGHTS_NAME).is_file()
    real, calls = mopoe.io._write, []
    def full_disk(f, data):                                                   # the disk fills up at the weights
        calls.append(len(data))
        if len(data) > 1_000_000: f.write(data[:len(data) // 2]); raise OSError(28, "No space left on device")
        real(f, data)
    monkeypatch.setattr(mopoe.io, "_write", full_disk)
    with pytest.raises(DiskFullError,
                       match=f"no space left on device while writing {tmp_path / 'new'}; nothing was written"):
        save_pretrained(src, tmp_path / "new")
    assert calls and not (tmp_path / "new").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["afile", "empty", "full"]   # no partial folder left behind


def test_export_of_a_run_still_being_written_is_refused(runs, tmp_path):
    src = runs["mopoe"]["out_dir"]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mopoe.io import run_lock
        with run_lock({src!r}):
            print("held", flush=True); time.sleep(60)""")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = subprocess.run([str(BIN / "mopoe-export"), src, str(tmp_path / "out")], capture_output=True, text=True,
                           env=ENV, timeout=300)
    finally: holder.kill(); holder.wait()
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "is in use by another mopoe process: PID" in p.stderr and not (tmp_path / "out").exists()


def test_from_pretrained_reads_the_hub_cache_offline(exported, runs, tmp_path, marker):
    cache, repo = tmp_path / "hub", "mopoe-test/tiny-mopoe"
    snap = hub_cache_entry(exported[0], repo, cache)
    (snap / "evil.pkl").write_bytes(pickle.dumps(Evil()))                  # a repo may hold anything: never read
    scan = huggingface_hub.scan_cache_dir(cache)                            # the hub's own view of the cache
    assert not scan.warnings and [r.repo_id for r in scan.repos] == [repo]
    (rev,) = next(iter(scan.repos)).revisions
    assert rev.refs == {"main"} and Path(rev.snapshot_path) == snap
    assert Path(huggingface_hub.hf_hub_download(repo, CARD_NAME, cache_dir=cache, local_files_only=True)).read_bytes() \
        == (exported[0] / CARD_NAME).read_bytes()
    script = textwrap.dedent(f"""
        import torch, safetensors.torch as st
        from mopoe.hub import load_pretrained
        p = load_pretrained({repo!r})
        torch.manual_seed(7)
        st.save_file(p.model.generate(6), {str(tmp_path / 'gen.safetensors')!r})
        print(p.folder)""")
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == snap
    torch.manual_seed(7)
    want = runs["mopoe"]["model"].eval().generate(6)
    got = st.load_file(tmp_path / "gen.safetensors")
    for m in want: assert torch.equal(want[m], got[m]), m
    with pytest.raises(FileNotFoundError, match="is not in the hub cache .* the hub is offline"):
        from_pretrained("mopoe-test/absent", cache_dir=cache, local_files_only=True)


@pytest.fixture
def fake_hub(monkeypatch):
    "HfApi.create_repo / upload_folder replaced: what would be sent is recorded (files chosen by the hub's own filter)."
    sent = []
    def create_repo(self, repo_id, **kw): sent.append(("create_repo", repo_id, kw)); return f"https://hf.co/{repo_id}"
    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kw):
        names = sorted(f.name for f in Path(folder_path).iterdir())
        chosen = huggingface_hub.utils.filter_repo_objects(names, allow_patterns=allow_patterns,
                                                           ignore_patterns=ignore_patterns)
        sent.append(("upload_folder", repo_id, {n: (Path(folder_path) / n).read_bytes() for n in chosen}, kw))
        return "commit"
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return sent


def test_push_to_hub_sends_the_pretrained_files_only(exported, runs, tmp_path, fake_hub, marker):
    d = _copy(exported, tmp_path)
    (d / "evil.pkl").write_bytes(pickle.dumps(Evil())); (d / "notes.txt").write_text("private")
    assert push_to_hub(d, "org/name", private=True) == "commit"
    (_, repo, kw), (_, repo2, files, up) = fake_hub
    assert repo == repo2 == "org/name" and kw["exist_ok"] and kw["private"] and kw["repo_type"] == "model"
    assert sorted(files) == sorted(PRETRAINED_FILES)                         # the pickle and the notes stay home
    assert files[WEIGHTS_NAME] == (exported[0] / WEIGHTS_NAME).read_bytes() and "config" in up["commit_message"]
    fake_hub.clear()
    push_to_hub(load_run(runs["mmvaeplus"]["out_dir"]), "org/plus")        # a run: exported on the way
    files = fake_hub[1][2]
    card = files[CARD_NAME].decode()
    assert sorted(files) == sorted(PRETRAINED_FILES) and 'from_pretrained("org/plus")' in card
    assert yaml.safe_load(card.split("---\n")[1])["model-index"][0]["name"] == "plus"
    assert json.loads(files[CONFIG_NAME])["build_options"]["objective_options"] == "K=2"
    fake_hub.clear()
    _truncated(d)
    with pytest.raises(PretrainedError, match=f"has {(exported[0] / WEIGHTS_NAME).stat().st_size - 1000:,} bytes"):
        push_to_hub(d, "org/name")
    with pytest.raises(ValueError, match="repo_id must be 'org/name'"): push_to_hub(exported[0], "no-org")
    assert fake_hub == []                                                    # nothing was sent for either


def test_save_pretrained_takes_every_form_of_a_run(runs, tmp_path):
    res = runs["mmvaeplus"]
    ref = save_pretrained(res["out_dir"], tmp_path / "folder")
    weights = (ref / WEIGHTS_NAME).read_bytes()
    saved = load_run(res["out_dir"])
    forms = {"SavedRun": saved, "run's dict": res, "Pretrained": load_pretrained(ref), "pretrained folder": ref,
             "model with config and info": res["model"]}
    for name, form in forms.items():
        kw = dict(config=res["config"], info=res["info"]) if name.startswith("model") else {}
        out = save_pretrained(form, tmp_path / name.replace(" ", "_").replace("'", ""), **kw)
        assert (out / WEIGHTS_NAME).read_bytes() == weights, name
        assert (json.loads((out / CONFIG_NAME).read_text())["build_options"]
                == json.loads((ref / CONFIG_NAME).read_text())["build_options"]), name
    with pytest.raises(TypeError, match="needs config= .* and info="): save_pretrained(res["model"], tmp_path / "bare")
    wrong = resolve_config(asdict(res["config"]), latent_dim=8)
    with pytest.raises(ValueError, match="the config given does not build this model .* nothing was written"):
        save_pretrained(res["model"], tmp_path / "wrong", config=wrong, info=res["info"])
    assert not (tmp_path / "bare").exists() and not (tmp_path / "wrong").exists()


def test_the_card_says_why_a_run_has_no_metrics(runs, tmp_path):
    src = tmp_path / "run"
    shutil.copytree(runs["mopoe"]["out_dir"], src)
    r = json.loads((src / RESULTS_NAME).read_text()); r["evaluated_epoch"] = 7
    (src / RESULTS_NAME).write_text(json.dumps(r))
    card = (save_pretrained(src, tmp_path / "a") / CARD_NAME).read_text()
    assert "No metrics: its results.json evaluated epoch 7, the checkpoint is epoch 1." in card
    assert "model-index" not in card
    (src / RESULTS_NAME).unlink()
    out = save_pretrained(src, tmp_path / "b")
    assert "No metrics: the run folder has no results.json (not evaluated)." in (out / CARD_NAME).read_text()
    assert not (out / RESULTS_NAME).exists()
