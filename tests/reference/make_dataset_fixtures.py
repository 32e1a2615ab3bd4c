#!/usr/bin/env python3
"""Fixtures for the dataset / image tests (tests/data/dataset/), from the real references:

  * img/*            small images written with Pillow (plus a few hand-built PNGs: 16-bit RGB,
                     huge IHDR, truncated, bad CRC) and bad captions;
  * decoded.safetensors   Pillow's decoding of each valid image: ImageOps.exif_transpose, then
                     convert("RGB") (uint8 [h, w, 3]) -- what our decoder must reproduce;
  * resize.safetensors    cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA) cases (kohya's
                     resize), opencv-python-headless pinned in requirements.txt;
  * buckets.json     kohya's make_bucket_resolutions + BucketManager.select_bucket for many sizes;
  * tree/ + tree.json     a DreamBooth folder tree and what kohya's DreamBoothDataset computes on it
                     (image list, repeats after reg balancing, buckets, len(dataloader) per batch
                     size, ss_dataset_dirs), plus FEB's tag frequency rule.

kohya sd-scripts is imported from /tmp/kohya-full (or $KOHYA_DIR) with stubs for the heavy
modules the dataset code does not use (albumentations, accelerate, voluptuous). Its glob/iterdir
order is file-system order; we sort both (per extension) as liblora does.

Run: tests/reference/.venv/bin/python tests/reference/make_dataset_fixtures.py
"""
import importlib
import importlib.machinery
import io
import json
import os
import pathlib
import random
import shutil
import struct
import sys
import types
import zlib

import numpy as np
from PIL import Image, ImageOps
import cv2
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, '..', 'data', 'dataset')
KOHYA = os.environ.get('KOHYA_DIR', '/tmp/kohya-full')


# ---- kohya import with stubs ----------------------------------------------------------------
class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Any()
    def __getattr__(self, n): return _Any()
    def __getitem__(self, k): return _Any()
    def __or__(self, o): return _Any()
    def __ror__(self, o): return _Any()
    def __mro_entries__(self, bases): return (object,)


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Any()


def import_kohya():
    import transformers  # noqa: F401  (before the accelerate stub: they probe for it)
    import diffusers  # noqa: F401
    import diffusers.optimization  # noqa: F401
    from diffusers import StableDiffusionPipeline, DDPMScheduler  # noqa: F401
    for m in ['albumentations', 'accelerate', 'voluptuous', 'einops', 'torchvision']:
        try:
            importlib.import_module(m)
        except Exception:
            st = _Stub(m)
            st.__spec__ = importlib.machinery.ModuleSpec(m, None)
            sys.modules[m] = st
    sys.path.insert(0, KOHYA)
    import library.train_util as tu
    import library.config_util as cu
    import library.model_util as mu
    return tu, cu, mu


# ---- PNG writer for what Pillow cannot write -------------------------------------------------
def png_chunk(t, data):
    return struct.pack('>I', len(data)) + t + data + struct.pack('>I', zlib.crc32(t + data) & 0xffffffff)


def png_bytes(w, h, depth, ctype, raw_rows):
    ihdr = struct.pack('>IIBBBBB', w, h, depth, ctype, 0, 0, 0)
    data = b''.join(b'\x00' + r for r in raw_rows)
    return b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', zlib.compress(data)) + png_chunk(b'IEND', b'')


def pattern(w, h, seed, mode='RGB'):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # smooth-ish content so lossy codecs keep it small but pixels still vary
    yy, xx = np.mgrid[0:h, 0:w]
    base[..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
    base[..., 1] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
    im = Image.fromarray(base, 'RGB')
    return im if mode == 'RGB' else im.convert(mode)


def make_images(img_dir):
    os.makedirs(img_dir, exist_ok=True)
    valid = {}
    def save(name, im, **kw):
        p = os.path.join(img_dir, name)
        im.save(p, **kw)
        valid[name] = p

    save('rgb.png', pattern(13, 9, 1))
    save('gray.png', pattern(11, 7, 2, 'L'))
    la = pattern(10, 6, 3, 'L')
    la.putalpha(Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10) * 4))
    save('gray_alpha.png', la)
    rgba = pattern(9, 8, 4)
    rgba.putalpha(Image.fromarray((np.arange(72, dtype=np.uint8) * 3).reshape(8, 9)))
    save('rgba.png', rgba)
    pal = pattern(12, 5, 5).convert('P', palette=Image.ADAPTIVE, colors=16)
    save('palette_trns.png', pal, transparency=3)
    save('gray1bit.png', pattern(17, 5, 6, 'L').convert('1'))
    save('gray16.png', Image.fromarray((np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300 + 7).astype(np.uint16), 'I;16'))
    # 16-bit RGB (Pillow cannot write it): built by hand
    rgb16 = (np.arange(7 * 5 * 3, dtype=np.uint32).reshape(5, 7, 3) * 611 + 5) % 65536
    with open(os.path.join(img_dir, 'rgb16.png'), 'wb') as f:
        f.write(png_bytes(7, 5, 16, 2, [r.astype('>u2').tobytes() for r in rgb16]))
    valid['rgb16.png'] = os.path.join(img_dir, 'rgb16.png')
    # Adam7-interlaced RGB (Pillow reads but cannot write it)
    il = np.array(pattern(11, 10, 31))
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b''
    for (x0, y0, dx, dy) in passes:
        sub = il[y0::dy, x0::dx]
        if sub.shape[0] and sub.shape[1]:
            raw += b''.join(b'\x00' + r.tobytes() for r in sub)
    ihdr = struct.pack('>IIBBBBB', 11, 10, 8, 2, 0, 0, 1)
    with open(os.path.join(img_dir, 'interlaced.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', zlib.compress(raw)) + png_chunk(b'IEND', b''))
    valid['interlaced.png'] = os.path.join(img_dir, 'interlaced.png')
    save('rgb.jpg', pattern(21, 13, 7), quality=90)
    save('gray.jpg', pattern(16, 9, 8, 'L'), quality=90)
    save('progressive.jpg', pattern(19, 11, 9), quality=85, progressive=True)
    for o in range(1, 9):
        ex = Image.Exif()
        ex[0x0112] = o
        save(f'orient{o}.jpg', pattern(12, 7, 10 + o), quality=95, exif=ex.tobytes())
    ex = Image.Exif()
    ex[0x0112] = 6
    save('orient6.png', pattern(10, 6, 30), exif=ex.tobytes())
    save('lossy.webp', pattern(20, 14, 11), quality=80)
    save('lossless.webp', pattern(15, 9, 12), lossless=True)
    wa = pattern(14, 10, 13)
    wa.putalpha(Image.fromarray((np.arange(140, dtype=np.uint8)).reshape(10, 14)))
    save('alpha.webp', wa, lossless=True)
    save('rgb.bmp', pattern(11, 6, 14))
    save('rgba.bmp', rgba)            # 32-bit

    # bad inputs
    Image.new('CMYK', (8, 8), (10, 20, 30, 40)).save(os.path.join(img_dir, 'cmyk.jpg'), quality=90)
    good = open(valid['rgb.png'], 'rb').read()
    big = pattern(64, 64, 15).tobytes()
    bigpng = png_bytes(64, 64, 8, 2, [big[i * 192:(i + 1) * 192] for i in range(64)])
    idat = bigpng.index(b'IDAT')
    open(os.path.join(img_dir, 'truncated.png'), 'wb').write(bigpng[:idat + 60])
    open(os.path.join(img_dir, 'zero.png'), 'wb').write(b'')
    ihdr = struct.pack('>IIBBBBB', 100000, 100000, 8, 2, 0, 0, 0)
    open(os.path.join(img_dir, 'huge.png'), 'wb').write(b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IEND', b''))
    badcrc = bytearray(bigpng)
    badcrc[idat + 30] ^= 0x55            # damage IDAT data: its CRC no longer matches
    open(os.path.join(img_dir, 'badcrc.png'), 'wb').write(bytes(badcrc))
    open(os.path.join(img_dir, 'notimage.png'), 'wb').write(b'<html>not an image</html>')
    jpg = open(valid['rgb.jpg'], 'rb').read()
    open(os.path.join(img_dir, 'truncated.jpg'), 'wb').write(jpg[:len(jpg) // 2])
    del good

    tensors = {}
    sizes = {}
    for name, p in sorted(valid.items()):
        im = ImageOps.exif_transpose(Image.open(p))
        arr = np.array(im.convert('RGB'), np.uint8)
        tensors[name] = np.ascontiguousarray(arr)
        sizes[name] = [int(arr.shape[1]), int(arr.shape[0])]
    # What kohya's PIL path gives for 16-bit gray (clipped to 255) differs from ours (high
    # byte): the expectation for gray16.png is the high byte, derived by hand here.
    g16 = (np.arange(48, dtype=np.uint32).reshape(6, 8) * 1300 + 7) >> 8
    tensors['gray16.png'] = np.repeat(g16.astype(np.uint8)[..., None], 3, axis=2)
    save_file(tensors, os.path.join(OUT, 'decoded.safetensors'))
    return sizes


def make_resize():
    rng = np.random.default_rng(7)
    cases = [((64, 48), (32, 24)), ((60, 45), (20, 15)), ((64, 64), (16, 16)), ((37, 29), (20, 15)),
             ((100, 80), (64, 51)), ((33, 47), (32, 46)), ((10, 7), (23, 16)), ((9, 6), (18, 12)),
             ((13, 11), (40, 31)), ((50, 20), (40, 30)), ((20, 50), (30, 40)), ((31, 17), (31, 9)),
             ((150, 100), (48, 32)), ((160, 107), (192, 128)), ((77, 51), (120, 80))]
    t = {}
    for i, ((sw, sh), (dw, dh)) in enumerate(cases):
        src = rng.integers(0, 256, size=(sh, sw, 3), dtype=np.uint8)
        if i % 3 == 0:   # also smooth content
            yy, xx = np.mgrid[0:sh, 0:sw]
            src[..., 0] = (xx * 7 + yy * 3) % 256
        dst = cv2.resize(src, (dw, dh), interpolation=cv2.INTER_AREA)
        t[f'case{i:02d}.src'] = src
        t[f'case{i:02d}.dst'] = np.ascontiguousarray(dst)
    # kohya-sized cases, stored as FNV-1a 64 hashes of cv2's output; the source is a formula the
    # C test repeats: v = (x*3 + y*5 + c*71 + ((x*y) >> 3)) & 255
    big = [((1200, 900), (683, 512)), ((1024, 768), (512, 384)), ((1023, 767), (512, 384)),
           ((300, 400), (512, 683)), ((640, 480), (683, 512)), ((4032, 3024), (683, 512))]
    hashes = []
    for (sw, sh), (dw, dh) in big:
        yy, xx, cc = np.meshgrid(np.arange(sh), np.arange(sw), np.arange(3), indexing='ij')
        src = ((xx * 3 + yy * 5 + cc * 71 + ((xx * yy) >> 3)) & 255).astype(np.uint8)
        dst = cv2.resize(src, (dw, dh), interpolation=cv2.INTER_AREA)
        hv = 1469598103934665603
        for b in dst.tobytes():
            hv = ((hv ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        hashes.append([sw, sh, dw, dh, str(hv)])
    with open(os.path.join(OUT, 'resize_big.json'), 'w') as f:
        json.dump(hashes, f)
    save_file(t, os.path.join(OUT, 'resize.safetensors'), metadata={'cv2': cv2.__version__})   # one key: byte-stable


def make_color_aug():
    """albumentations' uint8 hue shift and gamma (what kohya's color_aug applies), written out
    with cv2 and numpy exactly as albumentations 1.3 does, for fixed parameters."""
    rng = np.random.default_rng(21)
    src = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    src[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 255, 0], [0, 255, 255]]
    t = {'src': src}
    for i, shift in enumerate([-8.0, -3.5, 2.25, 7.9]):
        hsv = cv2.cvtColor(src, cv2.COLOR_RGB2HSV)
        hue, sat, val = cv2.split(hsv)
        lut = np.mod(np.arange(0, 256, dtype=np.int16) + shift, 180).astype(np.uint8)
        hue = cv2.LUT(hue, lut)
        t[f'hue{i}'] = cv2.cvtColor(cv2.merge((hue, sat, val)).astype(np.uint8), cv2.COLOR_HSV2RGB)
    for i, gamma in enumerate([0.95, 1.0123, 1.05]):
        table = (np.arange(0, 256.0 / 255, 1.0 / 255) ** gamma) * 255
        t[f'gamma{i}'] = cv2.LUT(src, table.astype(np.uint8))
    save_file(t, os.path.join(OUT, 'color_aug.safetensors'),
              metadata={'params': 'hue -8.0,-3.5,2.25,7.9; gamma 0.95,1.0123,1.05'})


def make_buckets(tu, mu):
    rng = random.Random(11)
    configs = [(512, 512, 256, 1024, 64), (768, 512, 256, 1024, 64), (512, 512, 128, 2048, 32), (640, 896, 320, 1536, 64)]
    sizes = [(512, 512), (256, 832), (832, 256), (1024, 1024), (1920, 1080), (1080, 1920), (3000, 100), (100, 3000),
             (640, 480), (480, 640), (513, 511), (767, 1023), (64, 64), (2048, 1536), (4000, 3000)]
    sizes += [(rng.randint(64, 4096), rng.randint(64, 4096)) for _ in range(150)]
    out = []
    for (w, h, mn, mx, st) in configs:
        for no_up in (False, True):
            bm = tu.BucketManager(no_up, (w, h), mn, mx, st)
            resos = []
            if not no_up:
                bm.make_buckets()
                resos = [list(r) for r in bm.predefined_resos]
            assign = []
            for (iw, ih) in sizes:
                reso, resized, _ = bm.select_bucket(iw, ih)
                assign.append([iw, ih, int(reso[0]), int(reso[1]), int(resized[0]), int(resized[1])])
            out.append({'width': w, 'height': h, 'min': mn, 'max': mx, 'steps': st, 'no_upscale': int(no_up),
                        'resos': resos, 'assign': assign})
    # make_bucket_resolutions directly as well (the list BucketManager keeps is this one)
    assert [list(r) for r in mu.make_bucket_resolutions((512, 512))] == out[0]['resos']
    with open(os.path.join(OUT, 'buckets.json'), 'w') as f:
        json.dump(out, f, separators=(',', ':'))


TREE = {
    'train': {
        '3_sks dog': [('a.png', (64, 64), 'Sks Dog, Blue Hair,  blue hair, ,smile\nsecond line ignored'),
                      ('b.jpg', (96, 64), None), ('c_1_2_3_4.png', (64, 96), None),
                      ('d.PNG', (64, 64), None), ('.hidden.png', (64, 64), None)],
        '2_cat': [('e.png', (128, 64), 'cat, sitting'), ('f.webp', (80, 80), '\ufeffcat, BOM caption')],
        'x_notnum': [('g.png', (64, 64), None)],
        '0_zero': [('h.png', (64, 64), None)],
    },
    'reg': {
        '1_dog': [('r1.png', (64, 64), None), ('r2.png', (64, 80), None), ('r3.png', (48, 64), None)],
        '2_animal': [('r4.png', (112, 64), 'an animal, \u65e5\u672c\u8a9e, "Quoted", back\\slash, cat \U0001F431\x7f')],
    },
}
# c_1_2_3_4.png takes its caption from c.caption (face-crop stem rule)
EXTRA_CAPTIONS = {('train', '3_sks dog', 'c.caption'): 'Sks Dog, Lying',
                  ('train', '2_cat', 'e.txt'): 'txt caption ignored'}


def make_tree(tu, cu):
    root = os.path.join(OUT, 'tree')
    shutil.rmtree(root, ignore_errors=True)
    seed = 100
    for top, folders in TREE.items():
        for folder, files in folders.items():
            d = os.path.join(root, top, folder)
            os.makedirs(d, exist_ok=True)
            for (name, (w, h), cap) in files:
                seed += 1
                im = pattern(w, h, seed)
                fmt = {'png': 'PNG', 'jpg': 'JPEG', 'webp': 'WEBP'}[name.rsplit('.', 1)[1].lower()]
                im.save(os.path.join(d, name), format=fmt, **({'quality': 80} if fmt != 'PNG' else {}))
                if cap is not None:
                    with open(os.path.join(d, name.rsplit('.', 1)[0] + '.caption'), 'w', encoding='utf-8') as f:
                        f.write(cap)
    for (top, folder, name), cap in EXTRA_CAPTIONS.items():
        with open(os.path.join(root, top, folder, name), 'w', encoding='utf-8') as f:
            f.write(cap)

    # kohya, with sorted listings
    orig_glob = tu.glob.glob
    tu.glob.glob = lambda p: sorted(orig_glob(p))
    orig_iterdir = pathlib.Path.iterdir
    pathlib.Path.iterdir = lambda self: iter(sorted(orig_iterdir(self)))

    class Tok:
        model_max_length = 77

    def run(batch, enable_bucket=True):
        confs = cu.generate_dreambooth_subsets_config_by_subdirs(os.path.join(root, 'train'), os.path.join(root, 'reg'))
        subsets = [tu.DreamBoothSubset(c['image_dir'], c['is_reg'], c['class_tokens'], '.caption', c['num_repeats'],
                                       False, 0, False, False, None, False, 0.0, 0, 0.0) for c in confs]
        ds = tu.DreamBoothDataset(subsets, batch, Tok(), None, (64, 64), enable_bucket, 32, 128, 16, False, 1.0, False)
        ds.make_buckets()
        return ds

    ds = run(1)
    rel = lambda p: os.path.relpath(p, root)
    images = []
    for key, info in ds.image_data.items():
        images.append({'path': rel(info.absolute_path), 'repeats': info.num_repeats, 'is_reg': int(info.is_reg),
                       'caption': info.caption, 'size': list(info.image_size), 'bucket': list(info.bucket_reso),
                       'resized': list(info.resized_size)})
    buckets = [{'reso': list(r), 'count': len(b)} for r, b in zip(ds.bucket_manager.resos, ds.bucket_manager.buckets)]
    lens = {str(b): len(run(b)) for b in (1, 2, 3, 5)}
    train_dirs, reg_dirs = {}, {}
    for s in ds.subsets:
        (reg_dirs if s.is_reg else train_dirs)[os.path.basename(s.image_dir)] = {'n_repeats': s.num_repeats, 'img_count': s.img_count}
    # FEB's set_tag_frequency (the reference commit strips tags; FEB did not):
    #   for tag in caption.split(","): if tag and not tag.isspace(): count tag.lower()
    # (captions read as utf-8-sig: liblora strips a UTF-8 BOM, kohya keeps it as U+FEFF)
    feb_freq = {}
    for s in ds.subsets:
        feb_freq.setdefault(os.path.basename(s.image_dir), {})
    # every globbed image of a folder counts, registered or not (reg balancing comes later)
    for s in ds.subsets:
        dname = os.path.basename(s.image_dir)
        paths = tu.glob_images(s.image_dir, '*')
        caps = []
        for p in paths:
            c = None
            base = os.path.splitext(p)[0]
            cands = [base + '.caption']
            toks = base.split('_')
            if len(toks) >= 5:
                cands.append('_'.join(toks[:-4]) + '.caption')
            for cp in cands:
                if os.path.isfile(cp):
                    c = open(cp, encoding='utf-8-sig').readline().strip()
                    break
            caps.append(s.class_tokens if c is None else c)
        d = feb_freq[dname]
        for cap in caps:
            for tag in cap.split(','):
                if tag and not tag.isspace():
                    tag = tag.lower()
                    d[tag] = d.get(tag, 0) + 1
    tu.glob.glob = orig_glob
    pathlib.Path.iterdir = orig_iterdir
    out = {'resolution': [64, 64], 'min_bucket_reso': 32, 'max_bucket_reso': 128, 'bucket_reso_steps': 16,
           'num_train_images': ds.num_train_images,
           'num_reg_images': ds.num_reg_images,
           'num_reg_images_after_balancing': sum(i['repeats'] for i in images if i['is_reg']),
           'images': images, 'buckets': buckets, 'len_by_batch': lens,
           'ss_bucket_info': json.dumps(ds.bucket_info),
           'ss_dataset_dirs': json.dumps(train_dirs), 'ss_reg_dataset_dirs': json.dumps(reg_dirs),
           'ss_tag_frequency_feb': json.dumps(feb_freq)}
    with open(os.path.join(OUT, 'tree.json'), 'w') as f:
        json.dump(out, f, indent=1, ensure_ascii=True)


def make_face_tree():
    """One face-crop image (no bucketing): x_100_80_40_40.png = face centre (100, 80), 40x40."""
    d = os.path.join(OUT, 'face', '1_face')
    os.makedirs(d, exist_ok=True)
    yy, xx = np.mgrid[0:160, 0:200]
    arr = np.stack([(xx * 255 // 199), (yy * 255 // 159), ((xx + yy) % 256)], axis=2).astype(np.uint8)
    Image.fromarray(arr, 'RGB').save(os.path.join(d, 'x_100_80_40_40.png'))


def main():
    os.makedirs(OUT, exist_ok=True)
    tu, cu, mu = import_kohya()
    make_images(os.path.join(OUT, 'img'))
    make_resize()
    make_color_aug()
    make_buckets(tu, mu)
    make_tree(tu, cu)
    make_face_tree()
    print('fixtures written to', os.path.normpath(OUT))


if __name__ == '__main__':
    main()
