"""Training cost: Stage I / Stage II step speed and memory, text encoding, quantizing, prefix tables.

For synthetic catalogues of 12k, 24k, 48k and 96k items (each size doubles the last, so growth
is visible) it measures, per size:

* ``quantize.hkmeans`` wall time on random 64-d embeddings (K=256) and the code lengths;
* ``decoding.CodeTrie`` build time and table memory (exact tensor bytes);
* a Stage I training step (``PRORecDIN.calculate_loss`` + backward + Adam step) and a Stage II
  step (``PRORec.calculate_loss`` with IKD + backward + Adam step) at batch 256: samples/s, the
  persistent state (parameters + Adam moments) and the peak memory growth of one step
  (activations, gradients, workspace; see ``common.PeakMemory``);
* ``PRORec.beam_search`` at batch 64, beam 20 (random weights);
* text encoding time, from ``semantic.encode_texts`` with the bundled MiniLM measured once on
  ``--encode-texts`` synthetic titles (load time + texts/s) and extrapolated linearly to each
  size (marked "est."; ``--encode-all`` encodes every size for real).

Models and datasets are real (RecBole datasets written to a temp folder, our model classes);
batches are random histories of 1-20 items. ``--dataset Amazon_Beauty`` instead times real
Stage I / Stage II steps on batches from RecBole's training loader for that dataset (Stage II
uses the cached Stage I output when it exists, else random codes of the same length).

    python benchmarks/train_speed.py            # 12k..96k items
    python benchmarks/train_speed.py --quick    # 1k, 2k items, 200 texts
    python benchmarks/train_speed.py --dataset Amazon_Beauty
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PeakMemory,
    Report,
    base_parser,
    fmt,
    load_run,
    markdown_table,
    sequential_batch,
    setup,
    synchronize,
    tensor_bytes,
    thread_limit,
    time_fn,
    write_synthetic_dataset,
)

BATCH = 256
SEMANTIC_DIM = 384  # MiniLM's width
WORDS = (
    "hydrating facial serum cream matte lipstick shampoo conditioner argan oil vitamin daily "
    "moisturizer sunscreen spf gentle cleanser foaming gel nail polish eyeliner waterproof mascara "
    "volume lash brush palette shimmer blush bronzer powder foundation liquid anti aging night eye "
    "repair mask clay charcoal tea tree rose water toner spray curl defining mousse dry texture "
    "hair men women travel size pack ounce natural organic fragrance free sensitive skin"
).split()
BRANDS = ["Lumina", "Oakridge", "Petalworks", "NordGlow", "Velvetine", "Cedar & Co", "Aurelia", "Brightleaf"]
CATEGORIES = ["Skin Care", "Hair Care", "Makeup", "Fragrance", "Tools & Accessories", "Bath & Body", "Nails"]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Beauty-like item texts in the format Stage I builds ("Title: .. Brand: .. Categories: ..")."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        title = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16)))).title()
        cats = ", ".join(rng.choice(CATEGORIES, size=2, replace=False))
        out.append(f"Title: {title}. Brand: {rng.choice(BRANDS)}. Categories: Beauty, {cats}.")
    return out


def train_step_fn(model, batch=None) -> tuple[Callable, torch.optim.Optimizer]:
    """One optimisation step as in training (losses summed, backward, Adam step) and its optimizer
    (fused, as ``SafeTrainer`` builds it)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    model.train()

    def step(b=batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = model.calculate_loss(b)
        loss = sum(losses) if isinstance(losses, tuple) else losses
        loss.backward()
        optimizer.step()

    return step, optimizer


def state_mib(model, optimizer) -> float:
    """Persistent training state: parameters and Adam's moments (exact tensor bytes)."""
    tensors = list(model.parameters())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes(tensors) / 2**20


def measure_steps(model, batch, device, repeats: int) -> tuple[float, float, float]:
    """(samples/s, state MiB, step peak MiB) of training steps on one batch.

    A warmup step first creates Adam's state; then the steps are timed; then one more step runs
    under ``PeakMemory`` (kept apart so the RSS sampler cannot slow the timed steps): its peak is
    the memory growth of a step (activations, gradients, workspace) on top of the state.
    """
    step, optimizer = train_step_fn(model, batch)
    timing = time_fn(step, device, warmup=1, repeats=repeats)
    with PeakMemory(device) as mem:
        step()
    return len(batch) / timing.median, state_mib(model, optimizer), mem.mib


def measure_batches(model, batches: list, device) -> tuple[float, float, float]:
    """Like ``measure_steps`` with one step per real batch (the first batch is the warmup)."""
    step, optimizer = train_step_fn(model)
    step(batches[0])
    synchronize(device)
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    synchronize(device)
    seconds = time.perf_counter() - start
    with PeakMemory(device) as mem:
        step(batches[-1])
    samples = sum(len(b) for b in batches[1:])
    return samples / seconds, state_mib(model, optimizer), mem.mib


def measure_encoding(n_texts: int, device: torch.device) -> dict:
    """Encoder load time and texts/s of ``semantic.encode_texts`` on ``n_texts`` synthetic titles.

    ``encode_texts`` loads the encoder on every call: an untimed 1-text call first pays the
    one-time imports, a timed 1-text call then gives the load time, and the rate is
    ``n_texts / (time of the n-text call - load time)``.
    """
    from recbole_prorec.semantic import encode_texts

    texts = synthetic_texts(n_texts)
    encode_texts(texts[:1], device=str(device), cache_dir=None)
    start = time.perf_counter()
    encode_texts(texts[:1], device=str(device), cache_dir=None)
    load = time.perf_counter() - start
    start = time.perf_counter()
    emb = encode_texts(texts, device=str(device), cache_dir=None)
    total = time.perf_counter() - start
    encode = total - load if total > 2 * load else total  # a noisy load time must not inflate the rate
    return {"texts": n_texts, "load_s": load, "total_s": total, "texts_per_s": n_texts / encode, "dim": emb.shape[1]}


def measure_size(n_items: int, root: Path, device: torch.device, args, encoding: dict) -> dict:
    """All per-size figures for a synthetic catalogue of ``n_items`` items."""
    from recbole_prorec.decoding import CodeTrie
    from recbole_prorec.quantize import hkmeans

    rng = np.random.default_rng(args.seed)
    emb = rng.standard_normal((n_items, 64)).astype(np.float32)
    with thread_limit(args):
        start = time.perf_counter()
        codes = hkmeans(emb, K=256, seed=args.seed)
        hk_s = time.perf_counter() - start
    array = np.vstack([np.full((1, codes.max_length), -1), codes.as_array()])
    code_tensor = torch.from_numpy(array).to(device)
    holder = {}
    t_trie = time_fn(lambda: holder.__setitem__("trie", CodeTrie(code_tensor, 256)), device, warmup=1, repeats=3)
    trie = holder["trie"]
    trie_mib = tensor_bytes(trie.children + trie.blocked + trie.leaf_item) / 2**20

    name = "synthetic"
    folder = root / f"n{n_items}"
    write_synthetic_dataset(folder, name, n_items, codes.codes, integrated=emb,
                            semantic=rng.standard_normal((n_items, SEMANTIC_DIM)).astype(np.float32), seed=args.seed)
    repeats = 2 if args.quick else 5

    sem_file = str(folder / name / f"{name}.sem.npy")
    din = load_run("PRORecDIN", folder, name, {"semantic_embedding_file": sem_file, "seed": args.seed}).model().to(device)
    batch = sequential_batch(din, BATCH, device, seed=args.seed, with_target=True).to(device)
    s1_rate, s1_state, s1_mem = measure_steps(din, batch, device, repeats)
    del din

    gen = load_run("PRORec", folder, name, {"seed": args.seed}).model().to(device)
    s2_rate, s2_state, s2_mem = measure_steps(gen, batch, device, repeats)
    gen.eval()
    users = sequential_batch(gen, 64, device, seed=args.seed + 1).to(device)
    t_beam = time_fn(lambda: gen.beam_search(users), device, warmup=1, repeats=repeats)
    del gen
    shutil.rmtree(folder, ignore_errors=True)

    if args.encode_all:
        enc = measure_encoding(n_items, device)
        enc_s, enc_label = enc["total_s"], fmt(enc["total_s"])
    else:
        enc_s = encoding["load_s"] + n_items / encoding["texts_per_s"]
        enc_label = f"{fmt(enc_s)} (est.)"
    lengths = np.bincount([len(c) for c in codes.codes])
    row = {
        "items": n_items, "hkmeans_s": hk_s, "trie_ms": t_trie.ms, "trie_mib": trie_mib,
        "stage1_samples_s": s1_rate, "stage1_state_mib": s1_state, "stage1_peak_mib": s1_mem,
        "stage2_samples_s": s2_rate, "stage2_state_mib": s2_state, "stage2_peak_mib": s2_mem,
        "beam_ms": t_beam.ms, "encode_s": enc_s,
    }
    row["cells"] = [
        f"{n_items:,}", fmt(hk_s, 2), ", ".join(f"{n}: {c}" for n, c in enumerate(lengths) if c),
        fmt(t_trie.ms, 2), fmt(trie_mib, 2), fmt(s1_rate), fmt(s1_state), fmt(s1_mem), fmt(s2_rate), fmt(s2_state),
        fmt(s2_mem),
        fmt(t_beam.ms), enc_label,
    ]
    print(f"  {n_items} items: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "cells"), flush=True)
    return row


# --------------------------------------------------------------------------- real dataset mode


def loader_batches(loader, n: int, device) -> tuple[list, float]:
    """The first ``n`` training batches on ``device`` and the seconds the loader took for them."""
    batches = []
    start = time.perf_counter()
    for inter in loader:
        batches.append(inter)
        if len(batches) >= n:
            break
    seconds = time.perf_counter() - start
    return [b.to(device) for b in batches], seconds


def stage2_folder(dataset: str, stage1_config, data, tmp: Path) -> tuple[Path, str]:
    """Stage I's cached output folder for this config, else a temp copy with random codes."""
    from recbole_prorec.artifact import Artifact, ItemCodes, write_artifact_files
    from recbole_prorec.quantize import random_codes
    from recbole_prorec.stage1 import stage1_key

    cached = Artifact.locate(stage1_config["unicode_dir"], dataset, stage1_key(stage1_config))
    if cached.complete:
        return cached.root, f"Stage I output {cached.folder}"
    source = Path(stage1_config["data_path"])
    target = tmp / dataset
    target.mkdir(parents=True)
    id_field = stage1_config["ITEM_ID_FIELD"]
    tokens = list(data.field2id_token[id_field])[1:]
    codes = random_codes(len(tokens), K=stage1_config["codebook_size"], seed=stage1_config["seed"])
    emb = np.random.default_rng(0).standard_normal((len(tokens), stage1_config["din_embedding_size"]))
    write_artifact_files(source, target, dataset, ItemCodes(tokens, codes.to_strings(), emb), id_field=id_field)
    return tmp, "random codes (no cached Stage I output for this config; run --stage=unicode for real ones)"


def _measure_stage(stage: int, label: str, model, train, config, n: int, device, rows: list, out: list) -> None:
    """Time ``n`` real training steps of one stage and append its table row and record."""
    batches, load_s = loader_batches(train, n + 1, device)
    rate, state, mem = measure_batches(model, batches, device)
    epoch_s = len(train._dataset) / rate
    rows.append([label, config["train_batch_size"], len(train), fmt(rate), fmt(state), fmt(mem),
                 fmt(epoch_s), fmt(sum(len(b) for b in batches) / load_s)])
    out.append({"stage": stage, "samples_s": rate, "state_mib": state, "peak_mib": mem, "epoch_s_est": epoch_s})


def dataset_mode(args, device: torch.device, report: Report) -> list[dict]:
    """Real Stage I / Stage II steps on batches of ``args.dataset`` from RecBole's loaders."""
    from recbole_prorec.build import build, load_data
    from recbole_prorec.registry import ModelSpec, resolve_model
    from recbole_prorec.prorec_din import PRORecDIN
    from recbole_prorec.stage1 import stage1_config

    n = args.steps or (4 if args.quick else 30)
    overrides = {"show_progress": False}
    rows, out = [], []
    # the default Stage I config (its stage1 block trains at batch 256), so a cached output is found
    cfg1 = stage1_config(args.dataset, [], overrides)
    run1 = load_data(ModelSpec("PRORecDIN", PRORecDIN), cfg1)
    start = time.perf_counter()
    din = run1.model().to(device)
    semantic_s = time.perf_counter() - start
    _measure_stage(1, "Stage I (PRORecDIN)", din, run1.train, cfg1, n, device, rows, out)
    del din
    with tempfile.TemporaryDirectory(prefix="prorec-train-speed-") as tmp:
        folder, source = stage2_folder(args.dataset, cfg1, run1.dataset, Path(tmp))
        run2 = build(resolve_model("PRORec"), args.dataset, [], overrides, data_folder=folder)
        gen = run2.model().to(device)
        _measure_stage(2, "Stage II (PRORec)", gen, run2.train, run2.config, n, device, rows, out)
    report.add(
        f"Real training steps on {args.dataset} ({n} timed steps after one warmup step; "
        f"semantic embeddings ready in {semantic_s:.1f} s; Stage II codes: {source}). "
        "Epoch time = training samples / samples/s (steps only, no evaluation or loader).\n\n"
        + markdown_table(["stage", "batch", "batches/epoch", "samples/s", "state MiB", "step peak MiB",
                          "epoch s (est.)", "loader samples/s"], rows)
    )
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None,
                        help="comma-separated item counts (default 12000,24000,48000,96000; quick 1000,2000)")
    parser.add_argument("--encode-texts", type=int, default=None,
                        help="texts encoded for the rate (default 2000; quick 200)")
    parser.add_argument("--encode-all", action="store_true", help="encode every catalogue size for real")
    parser.add_argument("--dataset", default=None, help="time real Stage I / II steps on this dataset instead")
    parser.add_argument("--steps", type=int, default=None, help="timed steps in --dataset mode (default 30; quick 4)")
    parser.add_argument("--seed", type=int, default=2020)
    args = parser.parse_args(argv)
    device = setup(args)
    report = Report("Training speed", ["benchmarks/train_speed.py", *(argv if argv is not None else sys.argv[1:])])
    if args.dataset:
        result = {"dataset": dataset_mode(args, device, report)}
        report.save(args.out)
        return result

    sizes = [int(s) for s in (args.sizes or ("1000,2000" if args.quick else "12000,24000,48000,96000")).split(",")]
    encoding = measure_encoding(args.encode_texts or (200 if args.quick else 2000), device)
    report.add(
        f"Text encoding (semantic.encode_texts, bundled all-MiniLM-L6-v2, batch 64, synthetic Beauty-like titles, "
        f"device {device}):\n\n" + markdown_table(
            ["texts", "encoder load s", "total s", "texts/s"],
            [[encoding["texts"], fmt(encoding["load_s"], 2), fmt(encoding["total_s"], 2),
              fmt(encoding["texts_per_s"])]],
        )
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="prorec-train-speed-") as tmp:
        for n in sizes:
            rows.append(measure_size(n, Path(tmp), device, args, encoding))
    report.add(
        f"Scaling with the catalogue (synthetic, random 64-d embeddings, K=256, batch {BATCH}, device {device}). "
        "Stage I = PRORecDIN (64-d, 32 sampled negatives, CKA); Stage II = paper-size PRORec with IKD; "
        "state MiB = parameters + Adam moments (exact); step peak MiB = memory growth during one training step "
        "after the timed ones (activations, gradients, workspace; CPU: process RSS); "
        "beam search at batch 64, beam 20:\n\n" + markdown_table(
            ["items", "hkmeans s", "code lengths", "trie build ms", "trie MiB", "Stage I samples/s",
             "Stage I state MiB", "Stage I step peak MiB", "Stage II samples/s", "Stage II state MiB",
             "Stage II step peak MiB", "beam search ms", "encode s"],
            [r.pop("cells") for r in rows],
        )
    )
    report.save(args.out)
    return {"encoding": encoding, "sizes": rows}


if __name__ == "__main__":
    main()
