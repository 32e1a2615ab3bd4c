"""`lora train` end to end on the tiny SD v1 model and a synthetic PNG dataset written by the
hidden `lora demo-images` command, checked with an independent reader (Python's json, struct
and hashlib, not liblora):
  - kohya's file names (epoch-000001, last, *-state) and metadata values;
  - sshs_model_hash = SHA-256 of the written file's data region (kohya's addnet hash);
  - --resume from the epoch-1 state gives a last.safetensors whose tensors are byte-identical
    to the uninterrupted run's;
  - Ctrl-C (SIGINT) mid-run: exit status 130, a state file and a message naming --resume; the
    resumed run ends with tensors byte-identical to an uninterrupted run of the same length;
  - an unknown option and a missing required option are refused with status 2."""
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile

lora = os.environ["LORA_EXE"]
data = os.environ["LORA_TEST_DATA"]
model = os.path.join(data, "sd", "v1_diffusers")
passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, file=sys.stderr)


def read(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    return header.get("__metadata__", {}), b[8 + n:], header


def train(args, **kw):
    return subprocess.run([lora, "train", "--pretrained_model_name_or_path", model, "--resolution", "64",
                           "--learning_rate", "1e-3", "--seed", "5", "--network_module", "networks.lora"] + args,
                          capture_output=True, text=True, **kw)


with tempfile.TemporaryDirectory() as tmp:
    ds = os.path.join(tmp, "data")
    r = subprocess.run([lora, "demo-images", ds, "--count", "6", "--size", "64"], capture_output=True, text=True)
    check(r.returncode == 0 and os.path.exists(os.path.join(ds, "5_shapes", "shape_000.png")), "demo-images: " + r.stderr)

    # 1. an uninterrupted run: 40 steps = 2 epochs of 30 batches (6 images x 5 repeats)
    out1 = os.path.join(tmp, "out1")
    common = ["--train_data_dir", ds, "--max_train_steps", "40", "--save_every_n_epochs", "1", "--save_state",
              "--network_dim", "8", "--network_alpha", "4", "--optimizer_type", "AdamW8bit",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "5"]
    r = train(common + ["--output_dir", out1])
    check(r.returncode == 0, "train: rc %d %s" % (r.returncode, r.stderr[-2000:]))
    names = sorted(os.listdir(out1)) if os.path.isdir(out1) else []
    check(names == ["epoch-000001-state.safetensors", "epoch-000001.safetensors", "last-state.safetensors",
                    "last.safetensors"], "files: %s" % names)
    check("loss curve" in r.stdout, "loss curve printed")
    if "last.safetensors" in names:
        meta, blob, header = read(os.path.join(out1, "last.safetensors"))
        want = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
                "ss_num_train_images": "30", "ss_num_batches_per_epoch": "30", "ss_num_epochs": "2",
                "ss_max_train_steps": "40", "ss_epoch": "2", "ss_seed": "5", "ss_learning_rate": "0.001",
                "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "5", "ss_resolution": "(64, 64)",
                "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit", "ss_sd_model_name": "v1_diffusers",
                "ss_dataset_dirs": json.dumps({"5_shapes": {"n_repeats": 5, "img_count": 6}})}
        for k, v in want.items():
            check(meta.get(k) == v, "%s = %r, want %r" % (k, meta.get(k), v))
        check(meta.get("sshs_model_hash") == hashlib.sha256(blob).hexdigest(), "sshs_model_hash = data-region sha256")
        e1, _, _ = read(os.path.join(out1, "epoch-000001.safetensors"))
        check(e1.get("ss_epoch") == "1", "epoch file ss_epoch %r" % e1.get("ss_epoch"))
        check(all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__"), "fp32 tensors")

    # 2. resume from the epoch-1 state: the same final tensors
    out2 = os.path.join(tmp, "out2")
    r = train(common + ["--output_dir", out2, "--resume", os.path.join(out1, "epoch-000001-state.safetensors")])
    check(r.returncode == 0, "resume: rc %d %s" % (r.returncode, r.stderr[-2000:]))
    if r.returncode == 0 and "last.safetensors" in names:
        _, a, _ = read(os.path.join(out1, "last.safetensors"))
        _, b, _ = read(os.path.join(out2, "last.safetensors"))
        check(a == b, "resumed run's tensors are byte-identical to the uninterrupted run's")
    # a state from another configuration is refused
    r = train(common[:-2] + ["--lr_warmup_steps", "6", "--output_dir", out2, "--resume",
                             os.path.join(out1, "epoch-000001-state.safetensors")])
    check(r.returncode != 0 and "LORA_E_RESUME_MISMATCH" in r.stderr and "lr_warmup_steps" in r.stderr,
          "mismatch: %s" % r.stderr[-500:])

    # 3. Ctrl-C mid-run, then resume
    long = ["--train_data_dir", ds, "--max_train_steps", "400", "--network_dim", "4", "--save_precision", "fp16"]
    ref = os.path.join(tmp, "ref")
    r = train(long + ["--output_dir", ref])
    check(r.returncode == 0, "reference long run: %s" % r.stderr[-500:])
    out3 = os.path.join(tmp, "out3")
    p = subprocess.Popen([lora, "train", "--pretrained_model_name_or_path", model, "--resolution", "64",
                          "--learning_rate", "1e-3", "--seed", "5", "--output_dir", out3] + long,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    while True:   # wait until training runs (a progress line), then Ctrl-C
        line = p.stderr.readline()
        if not line or line.startswith("steps"):
            first = line
            break
    p.send_signal(signal.SIGINT)
    so, se = p.communicate(timeout=300)
    se = first + se
    if p.returncode == 0 and not os.path.isdir(out3):
        check(False, "SIGINT run: no output folder")
    elif p.returncode == 0:
        print("note: the run finished before SIGINT arrived; interrupt path not exercised", file=sys.stderr)
    else:
        check(p.returncode == 130, "SIGINT: rc %d %s" % (p.returncode, se[-500:]))
        states = [f for f in os.listdir(out3) if f.endswith("-state.safetensors")]
        check(len(states) == 1 and "--resume" in se, "state %s, message %s" % (states, se[-300:]))
        if states:
            r = train(long + ["--output_dir", out3, "--resume", os.path.join(out3, states[0])])
            check(r.returncode == 0, "resume after SIGINT: %s" % r.stderr[-500:])
            _, a, ha = read(os.path.join(ref, "last.safetensors"))
            _, b, _ = read(os.path.join(out3, "last.safetensors"))
            check(a == b, "SIGINT + resume: tensors byte-identical to the uninterrupted run")
            check(all(v["dtype"] == "F16" for k, v in ha.items() if k != "__metadata__"), "save_precision fp16")

    # 4. bad command lines
    r = train(["--train_data_dir", ds, "--output_dir", out1, "--no_such_option", "1"])
    check(r.returncode == 2, "unknown option: rc %d" % r.returncode)
    r = subprocess.run([lora, "train", "--train_data_dir", ds], capture_output=True, text=True)
    check(r.returncode == 2, "missing options: rc %d" % r.returncode)

print("test_lora_train: %d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
