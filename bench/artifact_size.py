"""Measure the exported artifact size of a config without training: build the model of the knobs in the environment
at its initial weights (the zero-initialised layers given a trained-like spread), quantize it as the export would
and print the bytes of each variant, one JSON line each.

Usage: [KNOB=... ...] python bench/artifact_size.py [--variants base,mlp6,small8+lqer4,fit] [--gptq-seqs N]

A variant is tags joined by '+', applied on top of the environment's knobs:
    base            the knobs as they are          mlpN / attnN / embedN   QUANT_{MLP,ATTN,EMBED}_BITS=N
    small8          QUANT_SMALL_BITS=8             lqerR                   LQER_RANK=R
    gptq_embed      GPTQ_EMBED=1 (needs --gptq-seqs)
    fit             AUTO_FIT to MAX_ARTIFACT_BYTES minus the code (else: the steps as the knobs give them, x1)
--gptq-seqs N calibrates GPTQ on N training sequences of DATA_PATH (0: plain per-row rounding).

Initial (orthogonal) weights are close to Gaussian per row; trained weights have heavier tails and usually compress
somewhat better, so treat the figure as an estimate of the order of magnitude, not the final bytes_total.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

CPU = torch.device("cpu")


def parse_variant(tag_string: str) -> dict:
    """Hyperparameters field -> value for one variant ('mlp5+small8' -> {quant_mlp_bits: 5, quant_small_bits: 8})."""
    changes = {}
    for tag in filter(None, tag_string.split("+")):
        for prefix, field in (("mlp", "quant_mlp_bits"), ("attn", "quant_attn_bits"), ("embed", "quant_embed_bits"),
                              ("lqer", "lqer_rank")):
            if tag.startswith(prefix) and tag[len(prefix):].isdigit():
                changes[field] = int(tag[len(prefix):])
                break
        else:
            fixed = {"base": {}, "small8": {"quant_small_bits": 8},
                     "gptq_embed": {"gptq_embed": True}, "fit": {"auto_fit": True}}
            if tag not in fixed:
                raise ValueError(f"unknown variant tag {tag!r} (mlpN attnN embedN lqerR small8 gptq_embed fit "
                                 f"base; bit-packing and lzma are gone: the artifact is zstd only; sdclip is gone: "
                                 f"SDClip is the only clip rule, set by the SDCLIP_*_K knobs)")
            changes.update(fixed[tag])
    changes.setdefault("auto_fit", False)
    return changes


@torch.no_grad()
def init_model(h: tg.Hyperparameters) -> tg.GPT:
    """GPT(h) at its initial weights, zero-initialised layers redrawn so they do not compress to nothing."""
    torch.manual_seed(h.seed)
    model = tg.GPT(h)
    gen = torch.Generator().manual_seed(h.seed + 1)
    for m in model.modules():
        if isinstance(m, tg.CastedLinear) and m.zero_init:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.weight.size(1) ** -0.5)
    if model.bigram is not None:
        model.bigram.table.weight.copy_(torch.randn(model.bigram.table.weight.shape, generator=gen) * 0.02)
    return model


def gptq_names(model: tg.GPT, h: tg.Hyperparameters, gptq_embed: bool) -> set[str]:
    """The tensors train_gpt.calibrate collects Hessians for: quantized block matrices (and the tied embedding)."""
    return {n for n, p in model.named_parameters() if tg.tensor_bits(n, h) and p.numel() > h.passthrough_max_numel
            and (n.startswith("blocks.") or n == "tok_emb.weight" and gptq_embed)}


def calibration_hessians(model: tg.GPT, h: tg.Hyperparameters, seqs: int, seq_len: int, gptq_embed: bool):
    """GPTQ Hessians of the block matrices the export quantizes (and of the tied embedding), from the first
    seqs x seq_len training tokens of DATA_PATH."""
    names = gptq_names(model, h, gptq_embed)
    stream = tg.DistributedTokenLoader(os.path.join(h.data_path, "fineweb_train_*.bin"), h.vocab_size, 0, 1,
                                       torch.device("cpu"), h.train_seq_len, h.train_seq_len, prefetch=False)
    tokens = torch.from_numpy(stream.take(seqs * seq_len + 1).astype("int64"))
    x, y = tokens[:-1].view(seqs, seq_len), tokens[1:].view(seqs, seq_len)
    return tg.collect_hessians(model, [(x, y)], names, tg.Runtime(CPU))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptq-seqs", type=int, default=0, help="calibration sequences (0 = plain per-row rounding)")
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--variants", default="base", help="comma list of variants, each tags joined by +")
    args = ap.parse_args(argv)
    base = tg.Hyperparameters.from_env()
    try:
        variants = [(v, parse_variant(v)) for v in args.variants.split(",")]
    except ValueError as exc:
        ap.error(str(exc))
    model = init_model(base)
    print(tg.parameter_report(model), flush=True)
    hessians = None
    if args.gptq_seqs:
        embed = base.gptq_embed or any(c.get("gptq_embed") for _, c in variants)
        hessians = calibration_hessians(model, base, args.gptq_seqs, args.calib_seq_len, embed)
    for name, changes in variants:
        h = dataclasses.replace(base, **changes)
        h.validate()
        hs = None if hessians is None else {k: v for k, v in hessians.items()
                                            if k != "tok_emb.weight" or h.gptq_embed}
        config = tg.model_config(h, False)
        t0, log = time.time(), []
        if h.auto_fit:
            try:
                blob = tg.quantize_within_budget(model, h, hs, config, log=log.append)
            except tg.ArtifactTooLarge as exc:
                print(json.dumps({"variant": name, "error": str(exc)}), flush=True)
                continue
        else:  # the bytes as they are, over the budget or not
            blob = tg.serialize_artifact(tg.quantize_state(model, h, hs), config, h)
        print(json.dumps({"variant": name, "bytes_model": len(blob), "bytes_code": tg.code_bytes(),
                          "bytes_total": len(blob) + tg.code_bytes(), "gptq": bool(hs),
                          "auto_fit": log[-1] if log else None, "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
