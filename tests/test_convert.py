"""Checkpoints of the authors' code convert exactly: the converted model's every layer equals an independent
re-computation of their forward (tests/authors_format.py), their exit rule is `uem-authors`, and whatever
cannot run here is refused with nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adadiff_export.cli import main
from adadiff_export.files import sha256_file
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.model.convert import ConvertError, ConvertOptions, convert_file
from adadiff_export.sampling.early_exit import ExitPolicy, early_exit

from authors_format import authors_exit, authors_forward, authors_state_dict

REL = 1e-5

# name: (state-dict arguments, heads, convert options); depth 13 (k = 6) and others, with and without
# certainty modules, conditional and not, and every convention switch.
CASES = {
    "adadiff-cond-d13": (dict(img=8, chans=3, patch=2, width=32, k=6, rows=4, lte=True), 2,
                         ConvertOptions(null_class="last")),
    "adadiff-uncond-d5": (dict(img=8, chans=1, patch=2, width=32, k=2, rows=0, lte=True), 4, ConvertOptions()),
    "uvit-uncond-d7-mlp-bias-noconv": (dict(img=8, chans=3, patch=4, width=16, k=3, rows=0, lte=False,
                                            mlp_time=True, qkv_bias=True, conv=False), 2, ConvertOptions()),
    "uvit-cond-d13-nonull": (dict(img=8, chans=3, patch=2, width=16, k=6, rows=3, lte=False), 2, ConvertOptions()),
}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _inputs(case_args, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = case_args["chans"], case_args["img"]
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.rand(n, generator=g) * 0.98 + 0.01
    y = torch.randint(0, case_args["rows"], (n,), generator=g) if case_args["rows"] else None
    return x, t, y


def _save(sd, path: Path, wrap=None) -> Path:
    torch.save(sd if wrap is None else wrap(sd), path)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_computes_the_authors_function_layer_by_layer(name, tmp_path):
    args, heads, opts = CASES[name]
    sd = authors_state_dict(**args, seed=3)
    src = _save(sd, tmp_path / "authors.pth")
    conv = convert_file(src, ConvertOptions(**{**opts.__dict__, "heads": heads}))
    out = tmp_path / "converted.pt"
    ckpt.save(conv.payload, out)
    loaded = ckpt.load(out)
    c = loaded.model.config
    assert (c.img_size, c.in_chans, c.patch_size, c.embed_dim, c.depth, c.num_heads) == \
        (args["img"], args["chans"], args["patch"], args["width"], 2 * args["k"] + 1, heads)
    assert c.num_classes == (args["rows"] - 1 if opts.null_class == "last" else args["rows"])
    assert (c.time_scale, c.token_order, c.time_mlp, c.qkv_bias) == \
        (999.0, "label_first", args.get("mlp_time", False), args.get("qkv_bias", False))
    assert conv.fmt == ("adadiff" if args["lte"] else "uvit")
    x, t, y = _inputs(args)
    with torch.no_grad():
        ref_eps, ref_cert = authors_forward(sd, x, t, y, heads)
        got = loaded.model.forward_all_layers(x, t, y)
    assert len(got.eps_layers) == len(ref_eps) == c.depth
    for i, (e, r) in enumerate(zip(got.eps_layers, ref_eps)):
        assert _rel(e, r) < REL, f"layer {i + 1} eps"
    if args["lte"]:
        for i, (u, cert) in enumerate(zip(got.u_maps, ref_cert)):
            assert _rel(u, 1 - cert) < REL, f"layer {i + 1} uncertainty"
    prov = loaded.raw["provenance"]["converted_from"]
    assert prov["sha256"] == sha256_file(src) and prov["format"] == conv.fmt and prov["heads"] == heads


def test_in_memory_conversion_equals_the_converted_file_and_says_what_it_detected(tmp_path):
    args, heads, opts = CASES["adadiff-uncond-d5"]
    sd = authors_state_dict(**args, seed=4)
    # DDP prefixes and an {"ema", "model"} wrapper: the EMA copy is taken.
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    src = _save(sd, tmp_path / "wrapped.pth", lambda s: {"model": other, "ema": {"module." + k: v for k, v in s.items()},
                                                         "step": 7})
    loaded = ckpt.load(src, convert_options=ConvertOptions(heads=heads))
    assert "AdaDiff" in loaded.note and "'ema'" in loaded.note and "uem-authors" in loaded.note
    direct = ckpt.load(_save(sd, tmp_path / "plain.pth"), convert_options=ConvertOptions(heads=heads))
    for k, v in direct.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    assert loaded.defaults == {"policy": "uem-authors", "granularity": "batch", "threshold": 0.1, "patience": 1,
                               "guidance": 1.0}


@pytest.mark.parametrize("name", ["adadiff-cond-d13", "adadiff-uncond-d5"])
def test_uem_authors_is_their_exit_rule(name, tmp_path):
    args, heads, opts = CASES[name]
    sd = authors_state_dict(**args, seed=5, lte_gain=6.0)
    loaded = ckpt.load(_save(sd, tmp_path / "a.pth"), convert_options=ConvertOptions(**{**opts.__dict__,
                                                                                          "heads": heads}))
    model = loaded.model
    x, t, y = _inputs(args, n=6, seed=2)
    with torch.no_grad():
        ref_eps, cert = authors_forward(sd, x, t, y, heads)
    means = sorted(float(c.mean()) for c in cert[:-1])
    seen = set()
    # taus between the blocks' mean certainties, so each exits somewhere else
    for tau in [0.5 * (a + b) for a, b in zip(means, means[1:])] + [0.0, 1.0]:
        want = authors_exit(cert, tau)
        r = early_exit(model, x, t, y, ExitPolicy("uem-authors", threshold=1.0 - tau, granularity="batch"))
        assert r.exit_layer.tolist() == [want] * x.shape[0], tau
        assert _rel(r.eps, ref_eps[want - 1]) < REL
        seen.add(want)
    assert len(seen) >= 3, seen
    # Two stacked batches (guidance's halves) decide apart, as the authors' two calls do.
    x2, t2, y2 = _inputs(args, n=6, seed=9)
    with torch.no_grad():
        _, cert2 = authors_forward(sd, x2, t2, y2, heads)
    for tau in [0.5 * (a + b) for a, b in zip(means, means[1:])]:
        both = early_exit(model, torch.cat([x, x2]), torch.cat([t, t2]),
                          None if y is None else torch.cat([y, y2]),
                          ExitPolicy("uem-authors", threshold=1.0 - tau, granularity="batch"), groups=2)
        assert both.exit_layer.tolist() == [authors_exit(cert, tau)] * 6 + [authors_exit(cert2, tau)] * 6


def test_uem_authors_rule_on_scores():
    """In blocks need a second trigger (not consecutive); from the mid block on, the first exits."""
    from authors_format import authors_exit as rule

    def maps(values):
        return [torch.full((1, 1, 2, 2), v) for v in values]

    # depth 7: layers 1..3 in, 4 mid, 5..7 out; certainty above tau = 0.5 triggers
    assert rule(maps([0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1]), 0.5) == 3   # second in-block trigger, not consecutive
    assert rule(maps([0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]), 0.5) == 7   # one in-block trigger never exits
    assert rule(maps([0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1]), 0.5) == 4   # the mid block exits at the first
    assert rule(maps([0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1]), 0.5) == 6


def test_policy_checks():
    with pytest.raises(ValueError, match="granularity 'batch'"):
        ExitPolicy("uem-authors", threshold=0.1)
    with pytest.raises(ValueError, match="patience"):
        ExitPolicy("uem-authors", threshold=0.1, granularity="batch", patience=2)


def test_uvit_without_certainty_modules_gets_fresh_uems_and_says_so(tmp_path, capsys):
    args, heads, _ = CASES["uvit-cond-d13-nonull"]
    src = _save(authors_state_dict(**args), tmp_path / "uvit.pth")
    out = tmp_path / "c.pt"
    assert main(["convert", str(src), "-o", str(out), "--heads", str(heads), "--scale", "0.4"]) == 0
    text = capsys.readouterr().out
    assert "freshly initialised" in text and "no null class" in text and "--scale 0.4 ignored" in text
    raw = ckpt.read_raw(out)
    assert raw["defaults"]["policy"] == "static" and raw["defaults"]["guidance"] == 1.0
    assert torch.equal(raw["ema"]["label_emb.weight"][-1], torch.zeros(args["width"]))  # the appended null row
    assert main(["convert", str(src), "-o", str(out), "--heads", str(heads)]) == 2  # exists: --force
    assert main(["convert", str(src), "-o", str(out), "--heads", str(heads), "--force", "--null-class", "last",
                 "--scale", "0.4", "--tau", "0.92"]) == 0
    raw = ckpt.read_raw(out)
    assert raw["config"]["num_classes"] == args["rows"] - 1 and raw["defaults"]["guidance"] == pytest.approx(1.4)
    assert raw["defaults"]["threshold"] == pytest.approx(0.08)


def _refused(tmp_path, capsys, sd, *flags, match):
    src = _save(sd, tmp_path / "bad.pth")
    out = tmp_path / "never.pt"
    assert main(["convert", str(src), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob("never*"))
    return err


def test_refusals_name_what_is_missing_and_write_nothing(tmp_path, capsys):
    base = dict(img=8, chans=3, patch=2, width=16, k=1, rows=0, lte=False)
    latent = authors_state_dict(**{**base, "chans": 4})
    err = _refused(tmp_path, capsys, latent, "--heads", "2", match="autoencoder")
    assert "discrete-time" in err
    t2i = {**authors_state_dict(**base), "context_embed.weight": torch.zeros(16, 8),
           "context_embed.bias": torch.zeros(16)}
    err = _refused(tmp_path, capsys, t2i, "--heads", "2", match="text encoder")
    assert "autoencoder" in err
    _refused(tmp_path, capsys, authors_state_dict(**base), match="--heads")  # width 16: heads not derivable
    noskip = {k: v for k, v in authors_state_dict(**base).items() if "skip_linear" not in k}
    _refused(tmp_path, capsys, noskip, "--heads", "2", match="skip")
    extra = {**authors_state_dict(**base), "mystery.weight": torch.zeros(3)}
    _refused(tmp_path, capsys, extra, "--heads", "2", match="mystery.weight")
    _refused(tmp_path, capsys, authors_state_dict(**base), "--heads", "2", "--from", "adadiff",
             match="no certainty modules")
    _refused(tmp_path, capsys, {"weights": torch.zeros(2)}, match="no U-ViT state dict")


@pytest.mark.parametrize("kind", ["latent", "text"])
def test_every_command_refuses_latent_and_text_models_writing_nothing(kind, tmp_path, capsys):
    """build, sample, evaluate and train --init take an authors' file directly, so each refuses what cannot
    run here, with the one message `convert` gives, before writing anything."""
    base = dict(img=8, chans=3, patch=2, width=64, k=1, rows=0, lte=True)
    if kind == "latent":
        sd, what = authors_state_dict(**{**base, "chans": 4}), "autoencoder"
    else:
        sd = {**authors_state_dict(**base), "context_embed.weight": torch.zeros(64, 8),
              "context_embed.bias": torch.zeros(64)}
        what = "text encoder"
    src = _save(sd, tmp_path / "authors.pth")
    commands = {
        "build": ["build", str(src), "-o", str(tmp_path / "engines"), "--tensorrt", "off"],
        "sample": ["sample", str(src), "--n", "2", "--steps", "1", "--out", str(tmp_path / "grid.png")],
        "evaluate": ["evaluate", str(src), "--n", "2", "--steps", "1"],
        "train": ["train", "--init", str(src), "--out", str(tmp_path / "run"), "--steps", "1"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert what in err and "discrete-time" in err and err.count("\n") == 1, (name, err)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["authors.pth"], name


def test_in_memory_conversion_names_the_convert_flag_it_needs(tmp_path, capsys):
    """Heads that the weights cannot give: the commands that convert in memory point at `convert --heads`."""
    src = _save(authors_state_dict(img=8, chans=1, patch=2, width=16, k=1, rows=0, lte=True), tmp_path / "a.pth")
    assert main(["sample", str(src), "--n", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "adadiff_export convert" in err and "--heads" in err and not (tmp_path / "g.png").exists()


class Payload:  # unpickling it would need this module's code
    pass


def test_files_that_need_code_are_refused(tmp_path, capsys):
    src = tmp_path / "code.pth"
    torch.save({"model": Payload()}, src)
    assert main(["convert", str(src), "-o", str(tmp_path / "o.pt")]) == 2
    assert "unpickle" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="nor a state dict"):
        ckpt.load(_save({"weights": torch.zeros(2)}, tmp_path / "w.pth"))
    with pytest.raises(ConvertError, match="already an adadiff checkpoint"):
        convert_file(ckpt.SHIPPED_CHECKPOINT)
