"""
Run plumbing every stage shares: console lines, DDP setup, atomic checkpoints (weights, optimizer and
scheduler, RNG) and their checked loading, the metrics log. No entry point: train.py, pretrain.py
and eval.py import it.

A checkpoint is run_dir/step_XXXXXX/{model.safetensors, meta.json, state.pt} plus a `latest` file naming
it; every file is written to a temporary name and renamed, so a kill at any moment leaves the previous
checkpoint usable, and a damaged file is reported by name (BadInput) instead of a library traceback.
"""
import contextlib
import json
import os
import random
import shutil
import socket
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import model as M


def say(rank, msg):
    """One console line on what the job is doing, from the first process only."""
    if rank == 0:
        print(msg, flush=True)


def setup_dist():
    """(rank, world_size, device). Single process unless launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, dist.get_world_size(), torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")


def amp(bf16, device):
    """bf16 autocast under --bf16 (weights and optimizer state stay fp32), else nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def all_sum(values, device):
    """Sum of a few numbers over all ranks (themselves when not distributed)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# The base the main job starts from: `python train.py --stage pretrain` with the default flags writes the
# same recipe to out/pretrain (about 25 minutes on a 2-core CPU), so the main job can spend its time on RL.
COMMITTED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")


def checkpoint_path(args):
    """--ckpt as a folder: committed = base/ (with --showo-dir: None, Show-o itself), pretrain =
    <out-dir>/pretrain, anything else as given."""
    if args.ckpt == "committed":
        return None if args.showo_dir else COMMITTED_BASE
    return os.path.join(args.out_dir, "pretrain") if args.ckpt == "pretrain" else args.ckpt


class BadInput(Exception):
    """A missing or damaged input file or folder; main prints its message (which names the file and what
    was expected) as one line and exits 1. Anything else keeps its traceback: that is a bug."""


def check_world_fits(tok, cfg, data_dir, path):
    """The world's vocabulary layout (concept identifiers, then image codes) is the checkpoint's: a world
    with more or fewer concepts shifts every image code's id, so it would train or score silently wrong."""
    want = dict(vocab_size=tok.vocab_size, image_offset=tok.image_offset, codebook_size=tok.codebook_size,
                mask_id=tok.mask_id)
    have = {k: getattr(cfg, k) for k in want}
    if want != have:
        raise BadInput(f"{data_dir}: its world needs a vocabulary of {want['vocab_size']} ids (image codes from id "
                       f"{want['image_offset']}) but the checkpoint {path} has {have['vocab_size']} (image codes from "
                       f"{have['image_offset']}); use the world (--n-train-concepts/--n-test-concepts) it was made for")


def writable_dir(path, flag):
    """path as a folder this run can write (made if missing), or a BadInput naming it and why."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"{flag} {path}: cannot write there ({e.strerror or e}); expected a folder this user can write") from None
    return path


@contextlib.contextmanager
def run_lock(run_dir, flag="--out-dir"):
    """The run owns run_dir while it runs (a LOCK file naming its process): a second run on the same folder
    is refused, naming the folder and the running process; a lock whose process is gone (a killed run) is
    reported and taken over. Released on exit, whatever the exit."""
    writable_dir(run_dir, flag)
    path, me = os.path.join(run_dir, "LOCK"), {"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = {}  # a lock cut by a kill while being written
            pid = other.get("pid")
            if isinstance(pid, int) and (other.get("host") != me["host"] or process_alive(pid)):
                raise BadInput(f"{run_dir}: in use by another run (process {pid} on {other.get('host')}, started "
                               f"{other.get('started')}); wait for it, or give this run another {flag}") from None
            print(f"note: {path} was left by process {pid}, which is gone (a killed run); taking the folder over",
                  flush=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def from_files(f, *a):
    """f(*a) for data.py's readers of a world folder, whose errors on bad files name the file."""
    try:
        return f(*a)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(str(e)) from None


@contextlib.contextmanager
def writing(path):
    """Any failure to write under path (disk full, read-only, gone) as a BadInput naming it."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save on a full disk raises RuntimeError ("enforce fail ...")
        raise BadInput(f"{path}: could not write it ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                       "is the disk full or the folder read-only?") from None


def atomic_write(path, blob: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def save_checkpoint(run_dir, step, model, meta, state=None, keep=2):
    """run_dir/step_XXXXXX/{model.safetensors, meta.json, state.pt}: written into a temp folder, renamed,
    then `latest` is pointed at it; a crash at any moment leaves the previous checkpoint usable."""
    name = f"step_{step:06d}"
    tmp, final = os.path.join(run_dir, name + ".tmp"), os.path.join(run_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        try:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(meta, step=step, config=M.config_dict(model.cfg)), f, indent=1)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
            shutil.copymode(os.path.join(tmp, "meta.json"), os.path.join(tmp, "model.safetensors"))  # save_file makes it 0600
            if state is not None:
                torch.save(state, os.path.join(tmp, "state.pt"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
            raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(os.path.join(run_dir, "latest"), name.encode())
    old = sorted(d for d in os.listdir(run_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in old[:-keep]:
        shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    for d in os.listdir(run_dir):  # leftovers of a killed save (this save's own are renamed by now)
        if d.startswith("latest.tmp"):
            os.remove(os.path.join(run_dir, d))
        elif d.startswith("step_") and d.endswith(".tmp"):
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    return final


def resolve_ckpt(path):
    if path and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not path or not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise BadInput(f"checkpoint {path!r}: expected a folder with model.safetensors and meta.json "
                       "(a step_XXXXXX folder) or a run folder with a `latest` file")
    return path


def has_ckpt(path):
    try:
        resolve_ckpt(path)
        return True
    except BadInput:
        return False


def read_checkpoint(path, need_state=False, load_state=True):
    """(folder, meta, weights, state or None) of a checkpoint, every file checked: a damaged one is a
    BadInput naming it, rather than a library error (or NaNs that crash the sampler much later).
    load_state=False skips the optimizer state (twice the weights' size; evaluation needs none)."""
    path = resolve_ckpt(path)
    f = os.path.join(path, "meta.json")
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise BadInput(f"{f}: expected the checkpoint's metadata as JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(meta.get("step"), int):
        raise BadInput(f"{f}: expected a JSON object with 'step' and 'config' (the model's shape)")
    f = os.path.join(path, "model.safetensors")
    try:
        weights = load_file(f)
    except Exception as e:  # safetensors' own error type, whatever the damage
        raise BadInput(f"{f}: expected a safetensors file of the model's weights ({e})") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"{f}: expected finite weights, but NaN or inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    f, state = os.path.join(path, "state.pt"), None
    if load_state and os.path.isfile(f):
        try:
            state = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated zip (RuntimeError), an empty file (EOFError), a pickle error...
            raise BadInput(f"{f}: expected the optimizer state saved by torch.save "
                           f"({type(e).__name__}: {str(e).split('. ')[0] or 'empty'})") from None
    if need_state and not (isinstance(state, dict) and {"opt", "sched"} <= state.keys()):
        raise BadInput(f"{f}: expected the optimizer and scheduler state (a dict with 'opt' and 'sched') to resume from")
    return path, meta, weights, state


def load_weights(model, weights, path):
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # its message lists every mismatch, one per line after a header
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise BadInput(f"{os.path.join(path, 'model.safetensors')}: expected weights of this model's shape ({first})") from None


def load_checkpoint(path, device="cpu"):
    """(model, meta, state or None) from a checkpoint folder or run folder."""
    path, meta, weights, state = read_checkpoint(path)
    try:
        model = M.UnifiedModel(M.Config(**meta["config"]))
    except TypeError as e:
        raise BadInput(f"{path}/meta.json: 'config' is not a model configuration ({e})") from None
    load_weights(model, weights, path)
    return model.to(device), meta, state


def restore(run_dir, model, opt, sched):
    """Load a run's latest weights, optimizer and scheduler in place; returns (step, saved state)."""
    path, meta, weights, state = read_checkpoint(run_dir, need_state=True)
    load_weights(model, weights, path)  # into the live model: no second copy of the weights is built
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return meta["step"], state


def rng_state():
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])  # a GPU run resumed elsewhere keeps its CPU and Python streams


class JsonLog:
    def __init__(self, path, enabled, upto=0):
        """Rows of steps after `upto` are dropped first: a resumed run logs again the steps it redoes
        since its checkpoint, and a fresh run (upto 0) starts a fresh file; each step appears once."""
        self.f = None
        if enabled:
            kept = []
            for line in open(path) if os.path.isfile(path) else []:
                try:
                    row = json.loads(line)
                except ValueError:  # the last line, cut by a kill
                    continue
                if row.get("step", 0) <= upto:
                    kept.append(line.rstrip("\n") + "\n")
            atomic_write(path, "".join(kept).encode())
            self.f = open(path, "a")

    def __call__(self, row):
        if self.f:
            with writing(self.f.name):
                self.f.write(json.dumps(row) + "\n")
                self.f.flush()


def outputs(run_dir):
    """The closing console line: what the run left in its folder."""
    names = sorted(os.listdir(run_dir))
    pngs = [n for n in names if n.startswith("rollouts_")]
    names = [n for n in names if n not in pngs and n not in ("latest", "LOCK") and not n.startswith("step_")]
    latest = resolve_ckpt(run_dir) if has_ckpt(run_dir) else None
    return (f"outputs in {run_dir}: " + ", ".join(names + ([f"{len(pngs)} rollouts_*.png"] if pngs else []))
            + (f"; latest checkpoint {os.path.basename(latest)}/" if latest else ""))
