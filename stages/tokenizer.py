"""Train a SentencePiece tokenizer (unigram or BPE) and save it as a Hugging Face tokenizer folder.

    python -m torch.distributed.run --nproc_per_node 1 -m stages.tokenizer --spec spec.json

final/ loads with `AutoTokenizer.from_pretrained` and has the special tokens
BERT-style models need: <pad> 0, <unk> 1, [CLS] 2, [SEP] 3, [MASK] 4. It
encodes like the SentencePiece model itself. Rank 0 does the work; other
ranks (if any) only wait.

There are no checkpoints: on a stop request (SIGTERM, SIGUSR1, SIGINT) the stage
leaves the training unfinished, writes neither final/ nor result.json and exits 75;
running it again trains from the start (seconds to minutes).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from contract.kinds.tokenizer import SentencePiece
from contract.layout import EXIT_DONE, EXIT_STOPPED, final_dir
from stages.runtime import data, dist, entry, export, records, signals
from stages.runtime.dist import Dist
from stages.runtime.spec import Spec

SPECIALS = {"pad": "<pad>", "unk": "<unk>", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
SPM_FILE = "sentencepiece.model"  # kept beside tokenizer.json for tools that want the original model


def train_sentencepiece(sentences, *, vocab_size: int, model_type: str, character_coverage: float,
                        max_sentences: int, lowercase: bool, seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)  # input_sentence_size sampling
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        # Case folding inside SentencePiece's normaliser travels into tokenizer.json with its charsmap.
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    return model.getvalue()


def hf_tokenizer(spm_path: Path, max_length: int):
    """A `tokenizers`-backed tokenizer equivalent to the SentencePiece model, with BERT-style templates.

    `AlbertTokenizer(vocab_file=...)` no longer converts a .model file in
    transformers 5 (it keeps only its 5 special tokens) and is unigram-only,
    so build from the model proto, as transformers' own converter does.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(str(spm_path))
    vocab = extractor.extract(None)["vocab"]  # type: ignore[call-overload]  # a dict at run time, as in transformers' own converters
    backend = SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, vocab, None)
    cls_id, sep_id = backend.token_to_id(SPECIALS["cls"]), backend.token_to_id(SPECIALS["sep"])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, **{f"{k}_token": v for k, v in SPECIALS.items()}
    )


def main(spec: Spec, d: Dist) -> int:
    opts = spec.options_as(SentencePiece)
    records.start(d.world_size)
    digest = None
    final = final_dir(spec.stage_dir)
    if dist.is_main():
        raw = data.load_raw(spec)["train"]
        fields = [f for f in (spec.data.text_field, spec.data.text_pair_field) if f]
        sentences = (s for row in raw.select_columns(fields) for f in fields if (s := row[f]) and s.strip())
        t0 = time.perf_counter()
        try:
            # in C++ for most of the time: waited for so that a stop request is seen at once
            model = signals.unless_stopped(lambda: train_sentencepiece(sentences, seed=spec.seed, **opts.model_dump()))
            if signals.received():
                raise signals.Stopped
        except signals.Stopped:
            records.log("stop", step=0, reason="signal")
            dist.print0(f"{spec.stage}: stopped on a signal after {time.perf_counter() - t0:.1f} s of training; "
                        "nothing saved, exit 75 (running it again trains from the start)")
            return EXIT_STOPPED
        dist.print0(f"{spec.stage}: trained a {opts.vocab_size}-piece {opts.model_type} model "
                    f"in {time.perf_counter() - t0:.1f} s")
        tmp = export.staging(final)
        (tmp / SPM_FILE).write_bytes(model)
        hf_tokenizer(tmp / SPM_FILE, spec.data.max_length).save_pretrained(tmp)
        digest = export.publish(tmp, final)
    else:
        # Keep collective order identical: load_raw's rank-0-first barrier.
        data.load_raw(spec)
    export.write_result(spec, steps=0, samples=0, output=str(final), digest=digest,
                        metrics={"vocab_size": opts.vocab_size})
    return EXIT_DONE


if __name__ == "__main__":
    entry.run(main)
