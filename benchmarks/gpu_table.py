"""The markdown table of a benchmarks/gpu_offload.py run, from its result dict (or its saved JSON).

``lines = render(json.loads(Path("gpu_offload.json").read_text()))``; ``python benchmarks/gpu_offload.py
--table-from FILE`` prints it and appends it to RESULTS.md.
"""

from __future__ import annotations

from gpu_helpers import ZO2_PUBLISHED_GB

MEMORY_TARGET, SPEED_TARGET, LINK_TARGET = 0.8, 0.95, 0.85  # the issue's: x ZO2's peak, x in-GPU, x link rate


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _ok(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if r["status"] == "ok" and all(r[k] == v for k, v in match.items()):
            return r
    return None


def derived(row: dict, rows: list[dict]) -> dict:
    """Ratios of one row against ZO2's published peak, the in-GPU engine and MeZO's loop (None where unknown)."""
    out = dict(zo2=None, in_gpu=None, mezo=None, link=None, transfer_bound=None)
    if row["status"] != "ok":
        return out
    published = ZO2_PUBLISHED_GB.get(row["size"])
    if row["setting"] == "zo2" and row["peak_gb"] is not None and published:
        out["zo2"] = row["peak_gb"] / published
    same = dict(size=row["size"], setting=row["setting"])
    gpu = _ok(rows, mode="in-GPU", precision=row["precision"], **same)
    mezo = _ok(rows, mode="MeZO ref", precision=row["precision"], **same) or _ok(rows, mode="MeZO ref", **same)
    if gpu is not None and row is not gpu:
        out["in_gpu"] = row["tokens_per_s"] / gpu["tokens_per_s"]
    if mezo is not None and row is not mezo:
        out["mezo"] = row["tokens_per_s"] / mezo["tokens_per_s"]
    if row["link_bound_s"] is not None and row["step_s"]:
        out["link"] = row["link_bound_s"] / row["step_s"]  # achieved rate / link-bound rate
        if gpu is not None:
            out["transfer_bound"] = row["link_bound_s"] >= gpu["step_s"]
    return out


def render(result: dict) -> list[str]:
    """Markdown lines: set-up, bus rates, the per-row table and the issue's targets per streamed row."""
    meta, bw, rows = result["meta"], result.get("bandwidth") or {}, result["rows"]
    where = meta.get("gpu") or "CPU (--smoke: code paths only; no GPU memory, host copies for bandwidth)"
    lines = [f"### gpu_offload ({meta['started']}, {where}, torch {meta['torch']}, CUDA {meta.get('cuda')},"
             f" {meta['cpus']} CPUs, {meta['host_available_gb']:.0f} GB host RAM available)", ""]
    settings = ", ".join(f"`{k}` batch {b} x seq {s}" for k, (b, s) in meta["settings"].items())
    lines += [f"Random-init OPT of the published shapes; {settings}; {meta['warmup']} warm-up + {meta['steps']} timed"
              " steps per row. tokens/s = batch x seq / step time (each token counted once, although a step runs"
              " two forwards). Peak = `torch.cuda.max_memory_allocated` over the steps, GB = 1e9 bytes. Link-bound"
              " = the step's uploads and write-backs at the pinned rates below (full duplex at best); `of link"
              " rate` = link-bound / actual step time.", ""]
    if bw:
        rates = ", ".join(f"{k} {v:.1f}" for k, v in bw.items() if k != "pin_alloc")
        pinning = f"; host memory pinned at {bw['pin_alloc']:.1f} GB/s" if "pin_alloc" in bw else ""
        lines += [f"Bus (GB/s, best of the reps): {rates}{pinning}", ""]
    lines += [f"- `{name}`: {note}" for name, note in meta["precisions"].items()] + [""]
    if not result.get("finished"):
        lines += [f"**Run cut off** ({result.get('interrupted', 'killed')}): rows below are those measured.", ""]
    lines += ["| size | precision | mode | setting | peak GB | ÷ ZO2 peak | s/step | tokens/s | ÷ in-GPU |"
              " ÷ MeZO ref | GB up / down per step | link-bound s | of link rate | pinned host GB | status |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        d = derived(r, rows)
        updown = "—" if r["up_gb_step"] is None else f"{r['up_gb_step']:.2f} / {r['down_gb_step']:.2f}"
        lines.append(
            f"| {r['size']} | {r['precision']} | {r['mode']} | {r['setting']} | {_f(r['peak_gb'], '.2f')} |"
            f" {_f(d['zo2'], '.2f')} | {_f(r['step_s'], '.3f')} | {_f(r['tokens_per_s'], '.0f')} |"
            f" {_f(d['in_gpu'], '.2f')} | {_f(d['mezo'], '.2f')} | {updown} | {_f(r['link_bound_s'], '.3f')} |"
            f" {_f(d['link'], '.2f')}{'*' if d['transfer_bound'] else ''} | {_f(r.get('pinned_gb'), '.1f')} |"
            f" {r['status']} |")
    lines += ["", "`*`: transfer dominates (link-bound time >= the in-GPU step).", ""]
    lines += targets(rows)
    return lines


def targets(rows: list[dict]) -> list[str]:
    """The issue's three targets, judged on each streamed row."""
    out = [f"Targets: peak <= {MEMORY_TARGET}x ZO2's published (zo2 setting); tokens/s >= {SPEED_TARGET}x in-GPU"
           f" (where it fits); >= {LINK_TARGET}x the link-bound rate (where transfer dominates).", "",
           "| size | precision | mode | setting | memory | tokens/s vs in-GPU | vs link rate |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r["mode"].startswith("streamed") or r["status"] != "ok":
            continue
        d = derived(r, rows)
        mem = "—" if d["zo2"] is None else f"{'pass' if d['zo2'] <= MEMORY_TARGET else 'FAIL'} ({d['zo2']:.2f}x)"
        speed = "—" if d["in_gpu"] is None else (
            f"{'pass' if d['in_gpu'] >= SPEED_TARGET else 'FAIL'} ({d['in_gpu']:.2f}x)")
        if d["transfer_bound"] is None:
            link = "— (no in-GPU row)" if d["link"] is not None else "—"
        elif not d["transfer_bound"]:
            link = f"compute-bound ({d['link']:.2f}x)"
        else:
            link = f"{'pass' if d['link'] >= LINK_TARGET else 'FAIL'} ({d['link']:.2f}x)"
        out.append(f"| {r['size']} | {r['precision']} | {r['mode']} | {r['setting']} | {mem} | {speed} | {link} |")
    return out + [""]
