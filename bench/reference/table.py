"""Turns the JSON lines of `ddss-cli bench-unroll` ("side": "ours") and of `ddss_ref.py`
("side": "reference") into one Markdown table, ours next to the reference with the ratio
ours / reference (time: below 1 is faster; images/s: above 1 is faster; memory: below 1 is
smaller). Runs of ours with `--cuda-graphs` or `--channels-last` get rows of their own, next to the
same reference, and the loss values and gradient norms of the CUDA-graph runs are compared with the
eager runs of the same setting.

    python table.py RESULTS.jsonl [MORE.jsonl ...] [--title TEXT] [--out FILE.md]
                    [--step-goal 2] [--sample-goal 1.5]

After the tables come the headline comparisons ("goal met" against --step-goal and --sample-goal):
every K = 10 rematerialised step of ours against the reference's f32 per-call checkpoint, every
sampling run against the reference's f32 loop, and the per-call step's memory growth from K = 5
to K = 20.

Lines that do not parse as JSON objects (logs, warnings) are ignored. A measurement missing on
one side is shown as "-" (a failed or timed-out run), so a partial run still gives a table.
"""

import argparse
import json
import sys


def read_lines(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "side" in row and "what" in row:
                    rows.append(row)
    return rows


def fmt(value, digits):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def fmt_time(row):
    """Median seconds, with the range of the timed runs when there were several."""
    if not row or row.get("seconds") is None:
        return "-"
    times = row.get("times") or []
    if len(times) > 1:
        return f"{row['seconds']:.3f} ({min(times):.2f}-{max(times):.2f})"
    return f"{row['seconds']:.3f}"


def ratio(ours, ref):
    if ours is None or ref is None or ref == 0:
        return "-"
    return f"{ours / ref:.2f}"


def remat_label(remat):
    if remat == "per_call":
        return "per-call remat (ref: checkpoint per call)"
    if remat.startswith("budget:"):
        return f"budget remat, {remat.split(':')[1]} calls stored"
    if remat == "memory:0":
        return "per-call remat on tapes (memory:0)"
    if remat.startswith("memory:"):
        return f"memory-budget remat, {remat.split(':')[1]} MiB"
    if remat.startswith("free:"):
        return f"memory-budget remat, {remat.split(':')[1]}% of the free memory"
    return remat


def remat_order(remat):
    return {"naive": 0, "per_call": 1}.get(remat, 2)


def side_of(row):
    """"reference", or "ours" followed by "+graphs" for a `--cuda-graphs` run, "+cl" for a
    `--channels-last` run and "+chunkN" for a `--feature-chunk N` run; "+cudnn" after either for a
    `--cudnn-benchmark` run."""
    if row["side"] != "ours":
        return row["side"] + ("+cudnn" if row.get("cudnn_benchmark") else "")
    side = "ours" + ("+graphs" if row.get("cuda_graphs") else "") + ("+cl" if row.get("channels_last") else "")
    if row.get("feature_chunk"):
        side += f"+chunk{row['feature_chunk']}"
    if row.get("cudnn_benchmark"):
        side += "+cudnn"
    return side


def variant_label(side):
    """The row label's suffix for a side of ours."""
    parts = {"graphs": "CUDA graphs", "cl": "channels-last", "cudnn": "cuDNN benchmark"}
    words = []
    for part in side.split("+")[1:]:
        words.append(f"feature chunks of {part[5:]}" if part.startswith("chunk") else parts.get(part, part))
    return "".join(f" + {w}" for w in words)


def ours_variants(entries):
    """The sides of ours present for one setting, eager first (at least "ours"), then the
    reference's own variants (cuDNN benchmark), labelled as such."""
    sides = sorted((s for s in entries if s.startswith("ours")), key=lambda s: (s.count("+"), s))
    variants = [(s, variant_label(s)) for s in sides] or [("ours", "")]
    return variants + [(s, " (the reference" + variant_label(s) + ")") for s in sorted(entries) if s.startswith("reference+")]


def largest_differences(pairs):
    """Largest relative differences of the loss and of the per-parameter gradient norms over
    `pairs` of rows (the second of a pair is the reference), as (loss, grad or None, number of
    compared pairs), or None when no pair has both losses."""
    loss_diffs, grad_diffs = [], []
    for row, ref in pairs:
        if not row or not ref or row.get("loss") is None or ref.get("loss") is None:
            continue
        loss_diffs.append(abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30))
        gr, gf = row.get("grad_norms") or {}, ref.get("grad_norms") or {}
        for name in set(gr) & set(gf):
            grad_diffs.append(abs(gr[name] - gf[name]) / max(abs(gf[name]), 1e-30))
    if not loss_diffs:
        return None
    return max(loss_diffs), (max(grad_diffs) if grad_diffs else None), len(loss_diffs)


def graphs_check(index, keys):
    """`largest_differences` between the CUDA-graph (and feature-chunk) runs of ours and the eager
    run of the same setting (same weights, same noise)."""
    return largest_differences(
        (index[key][side], index[key].get("ours"))
        for key in keys
        for side in index[key]
        if side.startswith("ours+") and "+cl" not in side
    )


def tapes_check(index, keys):
    """`largest_differences` between the steps of ours that keep or recompute calls on tapes (the
    budget strategies) and ours' eager per-call step of the same setting (same weights, same noise;
    the per-call step differentiates each call with autograd)."""
    return largest_differences(
        (index[key][side], index.get(("step", "per_call") + key[2:], {}).get("ours"))
        for key in keys
        if key[1].startswith(("budget:", "memory:", "free:"))
        for side in index[key]
        if side.startswith("ours") and "+cl" not in side
    )


def build(rows, title=None, step_goal=2.0, sample_goal=1.5):
    index = {}
    for row in rows:
        key = (
            row["what"], row.get("remat", "-"), row["steps"], row["batch"], row.get("precision", "f32"),
            row.get("model", "-"),
        )
        index.setdefault(key, {})[side_of(row)] = row  # the last run of a setting wins
    out = []
    if title:
        out += [f"### {title}", ""]
    devices = sorted({r.get("device", "?") for r in rows})
    kinds = sorted({r.get("memory_kind", "?") for r in rows})
    out.append(f"Device: {', '.join(devices)}. Memory: {', '.join(kinds)} (MiB). Times: median of the timed runs (range in brackets).")
    out.append("")

    # With several networks in the rows, each row names its network.
    several = len({k[5] for k in index}) > 1
    net = (lambda k: f"{k[5]}: ") if several else (lambda k: "")
    step_keys = sorted(
        (k for k in index if k[0] == "step"), key=lambda k: (k[5], k[4] != "f32", k[4], remat_order(k[1]), k[2], k[3])
    )
    if step_keys:
        out.append("**One DDSS step** (sampler forward, KID loss, gradient to the sampler parameters)")
        out.append("")
        # On CUDA, the caching allocator's peak bytes in tensors as well (when both sides report
        # it; with CUDA graphs, their pool added: see `peak_alloc`).
        alloc = any(r.get("cuda_max_allocated_mib") is not None and side_of(r) != "reference" for r in rows)
        header = "| remat | precision | K | batch | ours s | ref s | time ours/ref | ours MiB | ref MiB | memory ours/ref |"
        if alloc:
            header += f" ours peak alloc{pool_note(rows)} MiB | ref peak alloc MiB | ours/ref |"
        out.append(header)
        out.append("|---" * (header.count("|") - 1) + "|")
        for key in step_keys:
            ref = index[key].get("reference")
            for side, label in ours_variants(index[key]):
                ours = index[key].get(side)
                ts = [r and r.get("seconds") for r in (ours, ref)]
                ms = [r and r.get("memory_mib") for r in (ours, ref)]
                stored = ours and ours.get("stored_steps")
                if stored is not None and key[1].startswith(("memory:", "free:")):
                    label += f" ({stored} stored, {ours.get('call_activation_mib', 0):.0f} MiB each)"
                row = (
                    f"| {net(key)}{remat_label(key[1])}{label} | {key[4]} | {key[2]} | {key[3]} | {fmt_time(ours)} | {fmt_time(ref)} | "
                    f"{ratio(ts[0], ts[1])} | {fmt(ms[0], 0)} | {fmt(ms[1], 0)} | {ratio(ms[0], ms[1])} |"
                )
                if alloc:
                    al = [r and peak_alloc(r) for r in (ours, ref)]
                    row += f" {fmt(al[0], 0)} | {fmt(al[1], 0)} | {ratio(al[0], al[1])} |"
                out.append(row)
        out.append("")
        for what, check, unit in (
            ("CUDA graphs / feature chunks vs eager (ours)", graphs_check(index, step_keys), "settings"),
            ("Calls on tapes (budget remat) vs autograd per call (ours)", tapes_check(index, step_keys), "runs"),
        ):
            if check:
                loss_diff, grad_diff, n = check
                line = f"{what}: largest relative difference of the loss {loss_diff:.1e}"
                if grad_diff is not None:
                    line += f", of the gradient norms {grad_diff:.1e}"
                out.append(line + f" over {n} {unit}.")
                out.append("")
        against_reference = largest_differences((index[k].get("ours"), index[k].get("reference")) for k in step_keys)
        if any(r.get("random_weights") for r in rows):
            out.append("Loss values are not compared: each side draws its own random weights.")
            out.append("")
        elif against_reference:
            worst, grad_worst, n = against_reference
            out.append(f"Loss values ours vs reference: largest relative difference {worst:.1e} over {n} settings")
            if grad_worst is not None:
                out[-1] += f"; gradient norms per parameter: largest relative difference {grad_worst:.1e}"
            out.append("(equal noise only when the reference was given `--noise`; otherwise the noise differs).")
            out.append("")

    thr_keys = sorted((k for k in index if k[0] in ("sample", "features")), key=lambda k: (k[5], k[0], k[4] != "f32", k))
    if thr_keys:
        out.append("**Throughput** (no autograd)")
        out.append("")
        out.append("| what | precision | K | batch | ours img/s | ref img/s | ours/ref | ours MiB | ref MiB |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for key in thr_keys:
            ref = index[key].get("reference")
            for side, label in ours_variants(index[key]):
                ours = index[key].get(side)
                ips = [r and r.get("images_per_second") for r in (ours, ref)]
                ms = [r and r.get("memory_mib") for r in (ours, ref)]
                what = "sampling (DDIM)" if key[0] == "sample" else "feature extraction"
                feats = (ours or ref).get("features", "")
                if key[0] == "features":
                    what += f" ({feats.split('/')[-1]})"
                k = str(key[2]) if key[0] == "sample" else "-"
                out.append(
                    f"| {net(key)}{what}{label} | {key[4]} | {k} | {key[3]} | {fmt(ips[0], 1)} | {fmt(ips[1], 1)} | "
                    f"{ratio(ips[0], ips[1])} | {fmt(ms[0], 0)} | {fmt(ms[1], 0)} |"
                )
        out.append("")
    out += goals(index, step_goal, sample_goal)
    return "\n".join(out)


def peak_alloc(row):
    """The caching allocator's peak bytes in tensors of a run, in MiB (None where not reported).
    A run with CUDA graphs replays them in the graphs' private pool, which the allocator does not
    count as allocated: its peak is the larger of the whole run's peak (the warm-up, where the
    graphs are captured, included) and the timed runs' peak plus the pool."""
    peak = row.get("cuda_max_allocated_mib")
    pool, timed = row.get("cuda_graph_pool_mib"), row.get("cuda_timed_max_allocated_mib")
    if peak is not None and pool is not None and timed is not None:
        return max(peak, timed + pool)
    return peak


def pool_note(rows):
    """" (+ graph pool)" when a row's peak includes its CUDA graphs' pool (see `peak_alloc`)."""
    return " (+ graph pool)" if any(r.get("cuda_graph_pool_mib") is not None for r in rows) else ""


def peaks(*rows):
    """The peak memory of each row in one measure: `peak_alloc` when every row reports it, else
    `memory_mib`; with the name of the measure."""
    alloc = [peak_alloc(r) for r in rows]
    if all(a is not None for a in alloc):
        return alloc, "peak alloc" + pool_note(rows)
    return [r.get("memory_mib") for r in rows], rows[0].get("memory_kind", "memory")


def against_f32_reference(index, what, field):
    """(setting, row label, ours, reference) for every run of ours of `what` ("step": the
    rematerialised K = 10 steps; "sample": every sampling run) that has `field`, with the
    reference's f32 run it is compared with (the per-call step at K = 10 and the same batch, or the
    sampling loop at the same K and batch) when that has `field` too."""
    for key, entries in sorted(index.items(), key=lambda kv: str(kv[0])):
        kind, remat, k, batch, _, model = key
        if kind != what or (what == "step" and (k != 10 or remat == "naive")):
            continue
        ref_key = ("step", "per_call", 10, batch, "f32", model) if what == "step" else ("sample", "-", k, batch, "f32", model)
        ref = index.get(ref_key, {}).get("reference")
        if not ref or not ref.get(field):
            continue
        for side, label in ours_variants(entries):
            ours = entries.get(side)
            if ours and ours.get(field):
                yield key, label, ours, ref


def goals(index, step_goal=2.0, sample_goal=1.5):
    """The headline comparisons, for every batch and network present: each rematerialised K = 10
    step of ours (any precision and variant) against the reference's f32 per-call checkpoint
    (throughput ratio, peak memory ratio); each sampling run of ours against the reference's
    f32 loop; and how the peak memory of ours' per-call step grows from K = 5 to K = 20, next to
    the stored states' share (`state_batch_mib` per kept tensor: each step's input, prediction and
    noise, the reverse sweep's cotangents of its input and prediction, and the network output with
    CUDA graphs)."""
    out = []
    step_rows = []
    for (_, remat, _, batch, prec, model), label, ours, ref in against_f32_reference(index, "step", "seconds"):
        speed = ref["seconds"] / ours["seconds"]
        (mem, ref_mem), measure = peaks(ours, ref)
        mem_ratio = mem / ref_mem if mem is not None and ref_mem else None
        met = speed >= step_goal and mem_ratio is not None and mem_ratio <= 1.0
        stored = ours.get("stored_steps")
        extra = f" ({stored} stored)" if stored is not None and remat.startswith(("memory:", "free:")) else ""
        step_rows.append(
            f"| {model} | {remat_label(remat)}{extra}{label} | {prec} | {batch} | {ours['seconds']:.3f} | "
            f"{ref['seconds']:.3f} | {speed:.2f}x | {measure} | {fmt(mem, 0)} | {fmt(ref_mem, 0)} | "
            f"{fmt(mem_ratio, 2)} | {'yes' if met else 'no'} |"
        )
    if step_rows:
        out.append(
            f"**Goal: a K = 10 step at {step_goal:g}x the reference's f32 per-call checkpoint throughput, "
            "at no more than its peak memory**"
        )
        out.append("")
        out.append(
            "| network | ours | precision | batch | ours s | ref f32 per-call s | throughput ours/ref | memory measure "
            "| ours MiB | ref MiB | memory ours/ref | goal met |"
        )
        out.append("|---" * 12 + "|")
        out += step_rows
        out.append("")
    sample_rows = []
    for (_, _, k, batch, prec, model), label, ours, ref in against_f32_reference(index, "sample", "images_per_second"):
        speed = ours["images_per_second"] / ref["images_per_second"]
        sample_rows.append(
            f"| {model} | DDIM{label} | {prec} | {k} | {batch} | {ours['images_per_second']:.1f} | "
            f"{ref['images_per_second']:.1f} | {speed:.2f}x | {'yes' if speed >= sample_goal else 'no'} |"
        )
    if sample_rows:
        out.append(f"**Goal: sampling at {sample_goal:g}x the reference's f32 loop (images/s)**")
        out.append("")
        out.append("| network | ours | precision | K | batch | ours img/s | ref f32 img/s | ours/ref | goal met |")
        out.append("|---" * 9 + "|")
        out += sample_rows
        out.append("")
    growth_rows = []
    sides = {}
    for key, entries in index.items():
        what, remat, k, batch, prec, model = key
        if what == "step" and remat == "per_call" and k in (5, 20):
            for side, row in entries.items():
                sides.setdefault((model, batch, prec, side), {})[k] = row
    for (model, batch, prec, side), by_k in sorted(sides.items()):
        if 5 not in by_k or 20 not in by_k:
            continue
        (m5, m20), measure = peaks(by_k[5], by_k[20])
        if m5 is None or m20 is None:
            continue
        state = by_k[20].get("state_batch_mib")
        kept = 6 if "+graphs" in side else 5
        states = f"{15 * kept * state:.0f} ({kept} x 15 x {state:.2f})" if state else "-"
        who = "reference" if side == "reference" else "ours" + variant_label(side)
        growth_rows.append(
            f"| {model} | {who} | {prec} | {batch} | {measure} | {m5:.0f} | {m20:.0f} | {m20 - m5:.0f} | {states} |"
        )
    if growth_rows:
        out.append("**Goal: the per-call step's peak memory grows from K = 5 to K = 20 only by the stored states**")
        out.append("")
        out.append("| network | side | precision | batch | memory measure | K = 5 MiB | K = 20 MiB | growth MiB | 15 more steps' states MiB |")
        out.append("|---" * 9 + "|")
        out += growth_rows
        out.append("")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--title", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--step-goal", type=float, default=2.0,
                   help="throughput ratio a K = 10 step of ours should reach against the reference's f32 "
                   "per-call checkpoint (default 2, the CUDA goal; 1 on the CPU)")
    p.add_argument("--sample-goal", type=float, default=1.5,
                   help="images/s ratio sampling should reach against the reference's f32 loop (default 1.5)")
    args = p.parse_args()
    text = build(read_lines(args.inputs), args.title, args.step_goal, args.sample_goal)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
