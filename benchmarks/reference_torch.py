"""The reference's computation in PyTorch, timed on this machine (a yardstick, not a model).

docs/reference.md section 6 gives the reference's costs measured on another machine of the same
kind; machines of that kind differ in speed by up to 2x, so a target set relative to the
reference is only checkable if the reference runs beside mos-jax. This script runs the
work of the reference's training step, evaluation window and dynamic-evaluation update
pass as docs/reference.md sections 2 and 4 describe it, written the reference's way: PyTorch's
fused `nn.LSTM` per layer with the weight-dropped recurrent matrix swapped in every
call, the MoS head mixing probabilities of whole `[T*B*E, V]` softmaxes and returning
`log(p + 1e-8)`, autograd, `clip_grad_norm_` and a plain SGD update. It is written here
from that description; no code of the reference is used.

    python benchmarks/reference_torch.py [--config ptb|small|wt2] [--only train,eval,dynamic_eval]

prints one line per workload (tokens/s: median [min, max] of the timed calls after
warm-up) and the process's peak RSS; `--out F` also writes them as JSON. Needs torch
(`pip install -e '.[torch]'`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {  # emsize, nhid, nhidlast, experts, vocab, batch, bptt, eval batch
    "ptb": dict(emsize=280, nhid=960, nhidlast=620, experts=15, vocab=10000, batch=12,
                bptt=70, eval_batch=10, wdrop=0.5, dropout=0.4, dropouth=0.225,
                dropouti=0.4, dropoute=0.1, dropoutl=0.29),
    "small": dict(emsize=64, nhid=128, nhidlast=64, experts=4, vocab=10000, batch=12,
                  bptt=35, eval_batch=10, wdrop=0.5, dropout=0.4, dropouth=0.225,
                  dropouti=0.4, dropoute=0.1, dropoutl=0.29),
    "wt2": dict(emsize=300, nhid=1150, nhidlast=650, experts=15, vocab=33278, batch=15,
                bptt=70, eval_batch=10, wdrop=0.5, dropout=0.4, dropouth=0.2,
                dropouti=0.55, dropoute=0.1, dropoutl=0.29),
}


def locked(x, p, training):
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


class ReferenceMoS(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s
        d, h, hl, e, v = s["emsize"], s["nhid"], s["nhidlast"], s["experts"], s["vocab"]
        self.encoder = nn.Embedding(v, d)
        sizes = [(d, h), (h, h), (h, hl)]
        self.rnns = nn.ModuleList(nn.LSTM(i, o) for i, o in sizes)
        # The un-dropped recurrent matrices, as the reference's WeightDrop keeps them.
        self.raw_hh = nn.ParameterList(
            nn.Parameter(r.weight_hh_l0.detach().clone()) for r in self.rnns)
        for r in self.rnns:
            del r._parameters["weight_hh_l0"]
        self.prior = nn.Linear(hl, e, bias=False)
        self.latent = nn.Linear(hl, e * d)
        self.decoder = nn.Linear(d, v)
        self.decoder.weight = self.encoder.weight

    def forward(self, ids, hidden):
        s, training = self.s, self.training
        w = self.encoder.weight
        if training and s["dropoute"] > 0:
            keep = w.new_empty(w.size(0), 1).bernoulli_(1 - s["dropoute"])
            w = w * keep / (1 - s["dropoute"])
        x = locked(F.embedding(ids, w), s["dropouti"], training)
        new_hidden, raw = [], None
        for layer, (rnn, hh) in enumerate(zip(self.rnns, self.raw_hh)):
            rnn.weight_hh_l0 = F.dropout(hh, s["wdrop"], training)
            rnn.flatten_parameters()
            raw, state = rnn(x, hidden[layer])
            new_hidden.append(state)
            x = locked(raw, s["dropouth"], training) if layer < 2 else raw
        out = locked(raw, s["dropout"], training)
        t, b = out.shape[:2]
        prior = F.softmax(self.prior(out).view(-1, s["experts"]), -1)
        latent = locked(torch.tanh(self.latent(out)), s["dropoutl"], training)
        logit = self.decoder(latent.view(-1, s["emsize"]))
        prob = F.softmax(logit, -1).view(-1, s["experts"], s["vocab"])
        prob = (prob * prior.unsqueeze(2)).sum(1)
        return torch.log(prob + 1e-8), new_hidden, raw, out

    def init_hidden(self, b):
        return [(torch.zeros(1, b, r.hidden_size), torch.zeros(1, b, r.hidden_size))
                for r in self.rnns]


def _time(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_train(model, s, warmup, repeats):
    model.train()
    b, t = s["batch"], s["bptt"]
    ids = torch.randint(0, s["vocab"], (t + 1, b))
    params = list(model.parameters())
    hidden = model.init_hidden(b)

    def step():
        nonlocal hidden
        hidden = [(h.detach(), c.detach()) for h, c in hidden]
        logp, hidden, raw, out = model(ids[:-1], hidden)
        nll = F.nll_loss(logp, ids[1:].reshape(-1))
        loss = nll + 2.0 * out.pow(2).mean() + 1.0 * (raw[1:] - raw[:-1]).pow(2).mean()
        model.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-20.0)

    return [b * t / x for x in _time(step, warmup, repeats)]


def bench_eval(model, s, warmup, repeats):
    model.eval()
    b, t = s["eval_batch"], s["bptt"]
    ids = torch.randint(0, s["vocab"], (t + 1, b))
    hidden = model.init_hidden(b)

    def window():
        with torch.no_grad():
            logp, _, _, _ = model(ids[:-1], hidden)
            F.nll_loss(logp, ids[1:].reshape(-1)).item()

    return [b * t / x for x in _time(window, warmup, repeats)]


def bench_dynamic_eval(model, s, warmup, repeats, windows=16):
    """Batch 1, windows of 5: score, gradient, then the per-element update."""
    model.eval()
    params = list(model.parameters())
    ms = [torch.rand_like(p) * 1e-3 + 1e-4 for p in params]
    total = sum(m.mean() for m in ms)  # docs/reference.md section 4: MS / sum of tensor means
    decrate = [torch.clamp(m / total, max=1 / 0.075) for m in ms]
    theta0 = [p.detach().clone() for p in params]
    ids = torch.randint(0, s["vocab"], (5 * windows + 1, 1))
    lr, lamb, eps = 0.002, 0.075, 0.001

    def run():
        hidden = model.init_hidden(1)
        for w in range(windows):
            x, y = ids[5 * w:5 * w + 5], ids[5 * w + 1:5 * w + 6]
            hidden = [(h.detach(), c.detach()) for h, c in hidden]
            logp, hidden, _, _ = model(x, hidden)
            loss = F.nll_loss(logp, y.reshape(-1))
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p, p0, m, d in zip(params, theta0, ms, decrate):
                    p.add_(-lr * p.grad / (m + eps) + lamb * d * (p0 - p))

    return [5 * windows / x for x in _time(run, warmup, repeats)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="ptb", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--bptt", type=int, default=0)
    ap.add_argument("--only", default="train,eval,dynamic_eval")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = dict(SIZES[a.config])
    s["batch"] = a.batch or s["batch"]
    s["bptt"] = a.bptt or s["bptt"]
    torch.manual_seed(0)
    model = ReferenceMoS(s)
    result = {"config": a.config, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch": s["batch"], "bptt": s["bptt"]}
    benches = {"train": bench_train, "eval": bench_eval, "dynamic_eval": bench_dynamic_eval}
    for name in a.only.split(","):
        rates = benches[name](model, s, a.warmup, a.repeats)
        result[name] = {"median": round(statistics.median(rates), 1),
                        "min": round(min(rates), 1), "max": round(max(rates), 1)}
        r = result[name]
        print(f"reference {name:13s} {r['median']:9.1f} tokens/s [{r['min']}, {r['max']}]",
              flush=True)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak RSS {result['peak_rss_mb']} MB")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
