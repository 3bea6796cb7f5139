"""Measure the exported artifact size of a config without training: build the model at its initial weights
(optionally perturbed to mimic a trained weight spread), quantize with the knobs from the environment, and print
bytes per format choice. Usage: DATA_PATH=... python bench/artifact_size.py [--gptq-seqs N]

Initial (orthogonal) weights are close to Gaussian per row; trained weights have heavier tails and usually compress
somewhat better, so treat the figure as an estimate of the order of magnitude, not the final bytes_total.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gptq-seqs", type=int, default=0, help="calibration sequences (0 = plain per-row rounding)")
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--variants", default="mlp6,mlp5", help="comma list of variants, each tags joined by +: mlpN, attnN, bitpack, lzma, fit (AUTO_FIT to the budget)")
    args = ap.parse_args()
    base = tg.Hyperparameters.from_env()
    torch.manual_seed(base.seed)
    model = tg.GPT(base)
    with torch.no_grad():  # zero-init layers get a trained-like spread so they do not compress to nothing
        for m in model.modules():
            if isinstance(m, tg.CastedLinear) and m.zero_init:
                m.weight.normal_(0, m.weight.size(1) ** -0.5)
        if model.bigram is not None:
            model.bigram.table.weight.normal_(0, 0.02)
    hessians = None
    if args.gptq_seqs:
        names = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
        tokens = tg.TokenStream(os.path.join(base.data_path, "fineweb_train_*.bin"), base.vocab_size)
        x = torch.from_numpy(tokens.take(args.gptq_seqs * args.calib_seq_len).astype("int64"))
        hessians = tg.collect_hessians(model, [(x.view(args.gptq_seqs, -1), None)], names, 1)
    print(tg.parameter_report(model))
    for variant in args.variants.split(","):
        h = tg.Hyperparameters(**{**base.__dict__})
        for tag in variant.split("+"):
            if tag.startswith("mlp"):
                h.quant_mlp_bits = int(tag[3:])
            elif tag.startswith("attn"):
                h.quant_attn_bits = int(tag[4:])
            elif tag == "bitpack":
                h.bitpack = True
            elif tag == "lzma":
                h.compressor = "lzma"
        t0 = time.time()
        config = tg.model_config(h, False)
        h.auto_fit = "fit" in variant.split("+")
        blob = tg.quantize_within_budget(model, h, hessians, config)
        print(json.dumps({"variant": variant, "bytes_model": len(blob), "bytes_code": tg.code_bytes(),
                          "bytes_total": len(blob) + tg.code_bytes(), "gptq": bool(hessians),
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
