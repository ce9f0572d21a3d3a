"""Weights downloaded on first use through their libraries' own loaders and kept in their caches
(torchvision's in the torch hub cache, timm's in the Hugging Face cache); an offline mode that
never touches the network."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import WeightsNotFoundError

_OFFLINE_VARIABLES = ("CNNCODES_OFFLINE", "HF_HUB_OFFLINE")
DOWNLOAD_TIMEOUT_S = 15  # per socket operation: an unreachable network fails fast, never hangs


def offline() -> bool:
    """Whether the network is off limits: ``CNNCODES_OFFLINE=1`` (what ``--offline`` sets) or
    Hugging Face's own ``HF_HUB_OFFLINE=1``."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in _OFFLINE_VARIABLES)


def hub_checkpoint(weights_enum) -> Path:
    """Where torch.hub keeps (or would keep) the file of a torchvision weights enum member."""
    filename = os.path.basename(urlparse(weights_enum.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def download_torchvision(enum, f: Path) -> None:
    """Fetch a torchvision weights file into the torch hub cache the way torchvision does:
    ``load_state_dict_from_url`` with its progress bar on stderr, its hash-prefix check and its
    temporary ``.partial`` file, renamed into place only when whole and matching."""
    import http.client
    import socket
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    where = f"put {f.name} in {f.parent}/ (or set TORCH_HOME), or pass --weights PATH or --weights none"
    try:
        enum.get_state_dict(progress=True, check_hash=True)
    except (OSError, http.client.HTTPException) as e:  # URLError, refused, timed out, cut off
        reason = getattr(e, "reason", None) or e.__class__.__name__
        raise WeightsNotFoundError(f"could not download {enum.url} ({reason}): rerun when online, or "
                                   f"{where}.") from None
    except RuntimeError as e:  # torch.hub: "invalid hash value"; nothing is left in the cache
        if "hash" not in str(e):
            raise
        f.unlink(missing_ok=True)
        raise WeightsNotFoundError(f"the file downloaded from {enum.url} does not match the hash in its "
                                   f"name, so it was not kept: retry, or {where}.") from None
    finally:
        socket.setdefaulttimeout(previous)


_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in order


def timm_cached(repo: str) -> Path | None:
    """The file of ``repo`` already in the Hugging Face cache, if any (no network)."""
    from huggingface_hub import try_to_load_from_cache
    for filename in _TIMM_FILES:
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def timm_file(cfg: dict) -> Path:
    """The pretrained file of a timm config in the Hugging Face cache (``HF_HOME``), fetched
    there by huggingface_hub on first use as timm does (safetensors first); offline, the cache
    only."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise WeightsNotFoundError(f"timm's {cfg.get('architecture')} has no weights on the Hugging Face "
                                   f"hub; pass --weights PATH or --weights none.")
    cached = timm_cached(repo)  # a cached file needs no network at all
    if cached is not None:
        return cached
    todo = "run once online, or pass --weights PATH or --weights none"
    if offline():
        raise WeightsNotFoundError(f"timm weights {repo} are not in the Hugging Face cache ({HF_HUB_CACHE}), "
                                   f"and the network is off (--offline / CNNCODES_OFFLINE / HF_HUB_OFFLINE): "
                                   f"{todo}.")
    check_reachable(repo, "rerun when online (or --offline with the file in the Hugging Face cache), or pass "
                          "--weights PATH or --weights none")
    for filename in _TIMM_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError as e:  # the hub failed mid-way and the cache has no copy
            raise WeightsNotFoundError(f"could not download {repo}/{filename} ({e.__class__.__name__}): "
                                       f"{todo}.") from None
        except EntryNotFoundError:  # the repository has no such file: try the next
            continue
        except (HfHubHTTPError, OSError) as e:
            raise WeightsNotFoundError(f"could not download {repo}/{filename} ({e.__class__.__name__}): "
                                       f"{todo}.") from None
    raise WeightsNotFoundError(f"{repo} holds neither {' nor '.join(_TIMM_FILES)}: pass --weights PATH or "
                               f"--weights none.")


def check_reachable(repo: str, todo: str) -> None:
    """One quick connection to the hub first: huggingface_hub retries an unreachable host for
    about a minute, where a user without network should hear it in seconds (``todo``: what to
    do instead, in the one-line error)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT
    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=DOWNLOAD_TIMEOUT_S).close()
    except OSError as e:
        raise WeightsNotFoundError(f"could not reach {url.hostname} to download {repo} ({e.strerror or e}): "
                                   f"{todo}.") from None
