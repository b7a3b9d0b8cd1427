"""An anchor for the mini recipe's phoneme CTC, written without speechlab's models: fbank + BiLSTM + CTC.

Kaldi fbank (80 bins) with per-utterance mean/variance normalisation, two stride-2 1-D convolutions over time
(4x subsampling, 40 ms frames; ``--conv2d``: two 3x3 stride-2 convolutions over time and frequency instead), a 3-layer BiLSTM (192 units per direction), a linear CTC head; AdamW at a constant
lr, 4 utterances a batch, gradient norm clipped at 5. It trains on ``en_train`` until ``--cpu-minutes`` of process
CPU time are spent, validates on ``en_val`` every epoch, keeps the parameters of the best val PER and prints the test
PER of those once. speechlab is used only for I/O: the manifest reader, audio loading and the phoneme tokenizer.
PER = jiwer word error rate over space-separated phone tokens, as ``speechlab.tasks.ctc`` computes it.

    OMP_NUM_THREADS=1 python recipes/mini/local/anchor_bilstm.py            # 12 CPU-minutes, seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import jiwer
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from speechlab.atomic import write_text
from speechlab.audio import load_audio
from speechlab.data.manifest import read_manifest
from speechlab.data.text import PhonemeTokenizer

DATA = Path(__file__).resolve().parents[1] / "exp" / "data"


def fbank(audio: torch.Tensor) -> torch.Tensor:
    """audio: (samples,) float32 at 16 kHz in [-1, 1] -> (frames, 80) normalised log-mel features (10 ms hop)."""
    feats = torchaudio.compliance.kaldi.fbank(audio[None] * 32768, num_mel_bins=80, sample_frequency=16000)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def load_split(
    data: Path, name: str, tokenizer: PhonemeTokenizer | None
) -> tuple[list[dict], PhonemeTokenizer]:
    items = read_manifest(data / f"{name}.jsonl", require=("phonemes",))
    if tokenizer is None:
        tokenizer = PhonemeTokenizer.build(it["phonemes"] for it in items)
    for it in items:
        it["feats"] = fbank(load_audio(it["audio"], 16000))
        it["target"] = torch.tensor(tokenizer.encode(it["phonemes"]))
    return items, tokenizer


class BiLSTMCTC(nn.Module):
    """(B, T, 80) features -> (B, T/4, vocab) logits."""

    def __init__(
        self, vocab_size: int, hidden: int = 192, layers: int = 3, dropout: float = 0.1, conv2d: bool = False
    ) -> None:
        super().__init__()
        self.conv2d = conv2d
        if conv2d:  # ESPnet-style: 3x3 stride-2 convolutions over (time, frequency), then a projection
            channels = 32
            self.subsample = nn.Sequential(
                nn.Conv2d(1, channels, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.project = nn.Linear(channels * 20, 2 * hidden)  # 80 mel bins -> 20 after two stride-2 convs
        else:
            self.subsample = nn.Sequential(
                nn.Conv1d(80, 2 * hidden, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv1d(2 * hidden, 2 * hidden, 3, stride=2, padding=1),
                nn.ReLU(),
            )
        self.lstm = nn.LSTM(2 * hidden, hidden, layers, batch_first=True, bidirectional=True, dropout=dropout)
        self.head = nn.Linear(2 * hidden, vocab_size)

    @staticmethod
    def out_lengths(lengths: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            lengths = (lengths - 1) // 2 + 1  # kernel 3, stride 2, padding 1
        return lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conv2d:
            x = self.subsample(feats[:, None])  # (B, C, T/4, 20)
            x = self.project(x.permute(0, 2, 1, 3).flatten(2))
        else:
            x = self.subsample(feats.transpose(1, 2)).transpose(1, 2)
        out_lengths = self.out_lengths(lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, out_lengths, batch_first=True, enforce_sorted=False)
        x, _ = self.lstm(packed)
        x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=out_lengths.max().item())
        return self.head(x), out_lengths


def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(it["feats"]) for it in items])
    feats = nn.utils.rnn.pad_sequence([it["feats"] for it in items], batch_first=True)
    target_lengths = torch.tensor([len(it["target"]) for it in items])
    targets = torch.cat([it["target"] for it in items])
    return feats, lengths, targets, target_lengths


@torch.no_grad()
def per(model: BiLSTMCTC, items: list[dict], tokenizer: PhonemeTokenizer) -> float:
    model.eval()
    refs, hyps = [], []
    for it in items:
        logits, _ = model(it["feats"][None], torch.tensor([len(it["feats"])]))
        best = torch.unique_consecutive(logits[0].argmax(-1))
        hyps.append(tokenizer.decode(best[best != tokenizer.blank_id].tolist()))
        refs.append(it["phonemes"])
    model.train()
    return jiwer.wer(refs, hyps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-minutes", type=float, default=12.0, help="training budget in process CPU time")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of prepare.py's manifests")
    parser.add_argument(
        "--output", type=Path, help="also write the result here as JSON (run.sh's results table)"
    )
    parser.add_argument(
        "--conv2d", action="store_true", help="2-D (time x frequency) subsampling convolutions instead of 1-D"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    cpu_start = time.process_time()
    train, tokenizer = load_split(args.data, "en_train", None)
    val, _ = load_split(args.data, "en_val", tokenizer)
    test, _ = load_split(args.data, "en_test", tokenizer)
    model = BiLSTMCTC(tokenizer.vocab_size, conv2d=args.conv2d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {tokenizer.vocab_size}"
    )

    best = (math.inf, -1, None)  # (val PER, step, state_dict)
    step, epoch = 0, 0
    while epoch == 0 or time.process_time() - cpu_start < 60 * args.cpu_minutes:  # at least one epoch
        order = list(train)
        random.shuffle(order)
        losses = []
        for i in range(0, len(order), args.batch_size):
            feats, lengths, targets, target_lengths = collate(order[i : i + args.batch_size])
            logits, out_lengths = model(feats, lengths)
            log_probs = logits.log_softmax(-1).transpose(0, 1)
            loss = F.ctc_loss(
                log_probs, targets, out_lengths, target_lengths, reduction="sum", zero_infinity=True
            )
            loss = loss / target_lengths.sum()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        epoch += 1
        val_per = per(model, val, tokenizer)
        minutes = (time.process_time() - cpu_start) / 60
        print(
            f"epoch {epoch:3d} step {step:4d} train loss {sum(losses) / len(losses):.3f} "
            f"val PER {val_per:.3f} ({minutes:.1f} CPU-min)",
            flush=True,
        )
        if val_per < best[0]:
            best = (val_per, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    test_per = per(model, test, tokenizer)
    minutes = (time.process_time() - cpu_start) / 60
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"best val PER {best[0]:.3f} at step {best[1]}; test PER {test_per:.3f}; "
        f"{minutes:.1f} CPU-minutes in all (CPU {capability}, 1 thread)"
    )
    if args.output:
        result = {"val_per": best[0], "best_step": best[1], "steps": step, "epochs": epoch}
        result |= {"test_per": test_per, "cpu_minutes": round(minutes, 2), "cpu_capability": capability}
        write_text(args.output, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
