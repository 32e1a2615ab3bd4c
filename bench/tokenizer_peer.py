"""Peer for bench_tokenizer: transformers 4.25.1's slow CLIPTokenizer (with ftfy, as kohya runs
it) on the same prompts, the same calls kohya's get_input_ids makes, after one warm-up pass.
Prints "name prompts_per_second". Needs tests/reference/.venv.

    python bench/tokenizer_peer.py REPS tests/data/tokenizer/reference_ids.json
"""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import make_tokenizer_fixtures as F  # noqa: E402


def main():
    reps = int(sys.argv[1])
    texts = [c["text"] for c in json.load(open(sys.argv[2]))["cases"]]
    refs = F.reference_tokenizers()
    for name, flavour, mtl in (("sd1_75", "v1", None), ("sd1_225", "v1", 225),
                               ("sd2_75", "v2", None), ("sd2_225", "v2", 225)):
        tok = refs[flavour]
        for t in texts:
            F.kohya_input_ids(tok, t, mtl)
        start = time.perf_counter()
        for _ in range(reps):
            for t in texts:
                F.kohya_input_ids(tok, t, mtl)
        print("%s %.0f" % (name, reps * len(texts) / (time.perf_counter() - start)))
    print("# transformers %s slow CLIPTokenizer + ftfy, %d prompts, %d passes, torch tensors as kohya"
          % (F.transformers.__version__, len(texts), reps))


if __name__ == "__main__":
    main()
