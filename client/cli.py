"""Client subcommands: ``pictor classify | search | info | health | add | delete | get | list``.

They need only the light install. Output is a table for people, ``--json`` for scripts.
Exit codes: 0 done, 2 bad input (an unreadable image, an unknown key) or a request the server
refused, 4 server unreachable, busy (refused as busy each time the call was sent) or no answer
within --timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pictor.api import (
    CLASSIFIERS,
    DEFAULT_K,
    DEFAULT_NEIGHBORS,
    DEFAULT_TOP_K,
    MAX_GET_KEYS,
    MAX_K,
    MAX_WIDTH,
    UPSERT_CHUNK,
    canonical_label,
    first_control_character,
    request_too_large,
)
from pictor.config import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    client_max_message_mb,
    default_target,
    default_tls,
    default_token,
    number,
    whole_number,
)
from pictor.errors import (
    InvalidRequestError,
    NotFoundError,
    PictorError,
    ResourceExhaustedError,
    ServerBusyError,
    ServerUnavailableError,
    notes_text,
)
from pictor.image_files import (
    check_image_file,
    check_key_text,
    one_line,
    path_key,
    path_text,
    read_image_file,
)
from pictor.iterators import batched

if TYPE_CHECKING:
    from pictor.api import StoredItem
    from pictor.client.client import Classification, Hit, PictorClient

EXIT_UNREACHABLE = 4
_MOST_NAMED = 20  # keys an error message names
_FOLDER_HINT = "`pictor index` takes folders"  # said of a folder given where an image file is
# Keys given as paths are found as `pictor add` and `pictor index` store paths.
_PATH_FORM_HELP = "a key not in the index as given is also looked for as the path that add stores (./a//b.jpg: a/b.jpg)"


_CONNECTION_HELP = """\
environment:
  PICTOR_TARGET          the server's HOST:PORT when --target is not given
  PICTOR_TOKEN           the token of a server that takes calls only with one (health checks need none)
  PICTOR_TLS_CA          call over TLS, trusting this CA's certificates (PEM file) to have signed the server's
  PICTOR_TLS=1           call over TLS, trusting the system's CAs
  PICTOR_TLS_CLIENT_CERT and PICTOR_TLS_CLIENT_KEY
                         this client's certificate and key, for a server that takes only clients with one
  PICTOR_TLS_SERVER_NAME the name the server's certificate must be for (default: the host of the target)
  PICTOR_MAX_MESSAGE_MB  the largest request or reply (default 64)
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help=f"server address HOST:PORT (default {DEFAULT_TARGET}, or $PICTOR_TARGET)")
    p.add_argument("--timeout", type=number, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, example: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.\n\nexample:\n  {example}",
                       epilog=_CONNECTION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _parser(sub, "classify", "top-k labels for each image from a running server, or UNKNOWN when a "
                "trained head's open-set rule finds it fits none of its classes",
                "pictor classify photo.jpg other.png --top-k 3 --target localhost:50051")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF)")
    p.add_argument("--top-k", type=_int_in(1, MAX_K), default=DEFAULT_TOP_K,
                   help=f"labels per image, 1 to {MAX_K} (default {DEFAULT_TOP_K})")
    p.add_argument("--classifier", choices=CLASSIFIERS, default="default",
                   help="default: the trained head if the server has one (serve --model), else the "
                        "backbone's ImageNet labels, else (a backbone without them) the kNN vote; head: "
                        "the same without the kNN fallback; knn: vote of the nearest labelled items; "
                        "all: head and kNN vote, whether they agree, and the neighbours")
    p.add_argument("--neighbors", type=_int_in(0, MAX_K), default=0,
                   help=f"neighbours for the kNN vote, up to {MAX_K} (default 0 = the server's default, {DEFAULT_NEIGHBORS})")
    next(a for a in p._actions if a.dest == "json").help = (
        'print a JSON list, one object per image in the order given: its answer, or "error" saying why '
        'it was refused (exit 2), or "not classified: ..." when the server could not be reached or went '
        "away (exit 4) or on Ctrl-C (exit 130)")
    p.set_defaults(run=run_classify)

    p = _parser(sub, "search", "the indexed images most similar to a query image or indexed key",
                "pictor search photo.jpg -k 5 --label daisy")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="query image file")
    p.add_argument("--key", help=f"query by the key of an indexed item instead of an image; {_PATH_FORM_HELP}")
    p.add_argument("-k", type=_int_in(1, MAX_K), default=DEFAULT_K, help=f"number of results, 1 to {MAX_K} (default {DEFAULT_K})")
    p.add_argument("--label", action="append", default=[], help="only items with this label (repeatable)")
    p.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE",
                   help="only items whose attribute NAME equals VALUE (repeatable: items must match "
                        "every one; several --label match any)")
    p.add_argument("--nprobe", type=_int_in(0, MAX_WIDTH), default=0,
                   help=f"IVF lists to scan for this query, up to {MAX_WIDTH:,} (default 0 = the index's tuned value; "
                        "more: higher recall, slower; ignored by an index without IVF lists: `pictor info` "
                        "shows the index type)")
    p.add_argument("--ef-search", type=_int_in(0, MAX_WIDTH), default=0,
                   help=f"HNSW search width for this query, up to {MAX_WIDTH:,} (default 0 = the index's tuned value; "
                        "used only by an HNSW index: `pictor info` shows the index type)")
    p.set_defaults(run=run_search)

    p = _parser(sub, "info", "what a running server serves: backbone, index, classes, versions",
                "pictor info --target localhost:50051")
    p.set_defaults(run=run_info)

    p = _parser(sub, "health", "whether a running server is serving (exit 0) or not (exit 4; also when its index "
                "folder was deleted while it served): the standard gRPC health check, cheap enough for a container probe",
                "pictor health --target localhost:50051 --timeout 3")
    next(a for a in p._actions if a.dest == "json").help = (
        'print {"health": STATUS} (SERVING, NOT_SERVING, ...; UNREACHABLE or BUSY, with "error", when no '
        "answer came)")
    p.set_defaults(run=run_health)

    p = _parser(sub, "add", "add images to a running server's index (an existing key is replaced whole: image, label "
                "and attributes)",
                "pictor add new1.jpg new2.jpg --label tulips")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files; each one's key is its path as given, as `pictor index` keys files "
                        "(./a//b.jpg is a/b.jpg; an absolute path stays absolute)")
    p.add_argument("--label", default="", help="label for all the images")
    p.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE",
                   help="attribute for all the images, for `pictor search --attr` (repeatable)")
    p.add_argument("--key-prefix", default="",
                   help="prepend this text to each key, as is: end it with / for a folder-like prefix "
                        "(cam1/ + /data/a.jpg is cam1/data/a.jpg); the path is then kept as attribute `path`")
    p.set_defaults(run=run_add)

    p = _parser(sub, "delete", "remove items from a running server's index by key",
                "pictor delete photos/old.jpg")
    p.add_argument("keys", nargs="+", metavar="KEY",
                   help=f"keys of the items to remove; {_PATH_FORM_HELP}")
    p.add_argument("--missing-ok", action="store_true",
                   help="keys not in the index are not an error (exit 0, like `rm -f`); "
                        "without it they are named and the exit code is 2")
    p.set_defaults(run=run_delete)

    p = _parser(sub, "get", "the stored items (label, attributes, vector) of keys in a running server's index",
                "pictor get photos/a.jpg photos/b.jpg --vectors --json")
    p.add_argument("keys", nargs="+", metavar="KEY",
                   help=f"keys of the items (sent in calls of at most {MAX_GET_KEYS} distinct keys); {_PATH_FORM_HELP}")
    p.add_argument("--vectors", action="store_true", help="also print each item's stored vector")
    p.add_argument("--missing-ok", action="store_true",
                   help="keys not in the index are not an error (exit 0); without it they are "
                        "named and the exit code is 2")
    p.set_defaults(run=run_get)

    p = _parser(sub, "list", "every item of a running server's index in key order (key, label, "
                "attributes), or those a filter admits: to export an index or check a restored one",
                "pictor list --label tulips --json > tulips.jsonl")
    p.add_argument("--label", action="append", default=[], help="only items with this label (repeatable)")
    p.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE",
                   help="only items whose attribute NAME equals VALUE (repeatable)")
    p.add_argument("--after", default="", metavar="KEY",
                   help="start after this key (key order): to go on from a listing that was cut off")
    next(a for a in p._actions if a.dest == "json").help = "print one JSON object per item and line (JSON Lines)"
    p.set_defaults(run=run_list)


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` (to ``high``), refused once as a usage error
    (not once per image by the client)."""
    def parse(text: str) -> int:
        value = whole_number(text)
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def _client(args: argparse.Namespace, *, token: bool = True) -> PictorClient:
    """The client of a command: to --target, with $PICTOR_TOKEN unless ``token`` is False
    (health checks need none)."""
    from pictor.client.client import PictorClient

    target = default_target() if args.target is None else args.target  # an empty --target is refused
    return PictorClient(target, timeout=args.timeout, max_message_mb=client_max_message_mb(),
                        token=default_token() if token else None, tls=default_tls())


def _emit(args: argparse.Namespace, data: Any, table: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=lambda o: dataclasses.asdict(o), ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table)


def _guard_unreachable(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Unreachable or busy servers get their own exit code, so scripts can tell them from bad
    input (and try again later)."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ServerUnavailableError, ServerBusyError) as e:
            print(f"pictor {args.command}: error: {e}{notes_text(e)}", file=sys.stderr)
            from pictor.client.client import may_be_wrong_address

            if isinstance(e, ServerUnavailableError) and may_be_wrong_address(e):
                print("  (is `pictor serve` running there? another address: --target HOST:PORT or "
                      "PICTOR_TARGET; PICTOR_PORT moves only the server)", file=sys.stderr)
            return EXIT_UNREACHABLE
    return wrapped


@_guard_unreachable
def run_classify(args: argparse.Namespace) -> int:
    """One call per image; a bad image is reported by name and the others still answered (exit
    4 when one was refused as busy, else 2). The table is printed as the answers come, so a long
    list shows its progress."""
    results: list[dict[str, Any]] = []  # one per image done, answered or not: where a stop came
    failed, busy = 0, False
    try:
        with _client(args) as client:
            for path in args.images:
                data = None
                try:
                    data = read_image_file(path, folder_hint=_FOLDER_HINT)
                    r = client.classify(data, top_k=args.top_k, classifier=args.classifier,
                                        neighbors=args.neighbors)
                except ServerUnavailableError:  # not this image: the server
                    raise
                except PictorError as e:  # refused or failed on the server: this image only
                    error = str(e) if data is None else f"{path}: {e}"  # reading names the path itself
                    print(f"pictor classify: error: {one_line(error)}", file=sys.stderr)
                    results.append({"image": path_text(path), "error": path_text(error)})
                    failed += 1
                    busy = busy or isinstance(e, ServerBusyError)
                    continue
                results.append({"image": path_text(path), **dataclasses.asdict(r)})
                if not args.json:
                    lines = _classification_lines(path, r, neighbours=args.classifier == "all")
                    print("\n".join(lines), flush=True)
    except (ServerUnavailableError, KeyboardInterrupt) as e:  # wherever in the loop Ctrl-C comes
        _report_not_classified(args, results, e)
        raise
    if args.json:
        _emit(args, results, "")
    return EXIT_UNREACHABLE if busy else 2 if failed else 0


def _report_not_classified(args: argparse.Namespace, results: list[dict[str, Any]], e: BaseException) -> None:
    """The images from the one where the run stopped on: named in a note on ``e`` and, with
    --json, listed after the answers with an error each (a script sees every image; those after
    the one where it stopped were never sent, and say so)."""
    rest = args.images[len(results):]
    if rest and len(args.images) > 1:
        after = f" and the {len(rest) - 1} image(s) after it were" if len(rest) > 1 else " was"
        e.add_note(f"{one_line(rest[0])}{after} not classified"
                   + (f"; the results of the {len(results)} before it are printed" if results else ""))
    if args.json:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else one_line(str(e))
        not_classified = [{"image": path_text(p), "error": f"not classified: {why}" if i == 0
                           else f"not classified: not sent ({why} at {path_text(rest[0])})"}
                          for i, p in enumerate(rest)]
        _emit(args, results + not_classified, "")


def _classification_lines(path: str, r: Classification, *, neighbours: bool) -> list[str]:
    lines = [f"{one_line(path)}  ({r.source}{', UNKNOWN' if r.unknown else ''})"]
    if r.unknown and r.open_set is not None:
        lines.append(f"  unknown: {r.open_set.reason}")
    lines += [f"  {x.score:6.3f}  {x.name}" for x in r.labels]
    if not r.labels and r.source == "knn":
        lines.append(f"  (no vote: none of the {len(r.neighbors)} nearest items has a label; --neighbors takes more)")
    if r.knn_labels and r.source != "knn":
        # Agreement means something only between a trained head and the index's labels.
        agree = "" if r.agree is None else f" ({'agrees' if r.agree else 'disagrees'})"
        lines.append(f"  kNN vote{agree}: " + ", ".join(f"{x.name} {x.score:.2f}" for x in r.knn_labels))
    if neighbours:  # --json always has them
        lines += [f"  neighbour {h.score:6.3f}  {_hit_text(h)}"
                  for h in r.neighbors]
    return lines


def _hit_text(h: Hit | StoredItem) -> str:
    return f"{_table_cell(h.key)}{'  [' + _table_cell(h.label) + ']' if h.label else ''}"


def _item_row(it: Hit | StoredItem) -> str:
    attrs = " ".join(f"{_table_cell(k)}={_attribute_value(v)}" for k, v in sorted(it.attributes.items()))
    return "  ".join(filter(None, [_hit_text(it), attrs]))


def _attribute_value(text: str) -> str:
    """Quoted when it holds a space: in ``a=x y b=z`` where one value ends is a guess."""
    return repr(text) if any(c.isspace() for c in text) else _table_cell(text)


def _table_cell(text: str) -> str:
    """Text as a table cell: quoted when it holds a line break or another control character, or
    starts or ends with a space (invisible otherwise)."""
    return repr(text) if first_control_character(text) or text != text.strip() else text


# Line ends that JSON leaves raw in strings but str.splitlines() and some readers split on.
_LINE_ENDS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(record: dict[str, Any]) -> str:
    """One JSON Lines record: text kept readable (not \\u-escaped) but for the line ends above,
    so a key holding one still reads back as one record."""
    return json.dumps(record, ensure_ascii=False).translate(_LINE_ENDS_IN_JSON)


def _utf8_text(value: str, flag: str) -> str:
    """``value`` of ``flag``, refused when it is not UTF-8 (bytes the shell passed on as they
    were, which a label, attribute or key cannot hold)."""
    if path_text(value) != value:
        raise InvalidRequestError(f"{flag} '{path_text(value)}' is not UTF-8 text")
    return value


def _parse_filter(labels: Sequence[str], pairs: Sequence[str]) -> dict[str, str]:
    """The attributes of a --label/--attr filter, once its labels are known to be text."""
    for label in labels:
        _utf8_text(label, "--label")
    return _parse_attrs(pairs)


def _parse_attrs(pairs: Sequence[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = _utf8_text(pair, "--attr").partition("=")
        if not sep or not name:
            raise InvalidRequestError(f"--attr takes NAME=VALUE, got {pair!r}")
        if attrs.get(name, value) != value:  # an item has one value per name: the last would win
            raise InvalidRequestError(f"--attr {name} is given twice ({attrs[name]!r} and {value!r}); "
                                      "an item has one value per attribute")
        attrs[name] = value
    return attrs


@_guard_unreachable
def run_search(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.key is None):
        raise InvalidRequestError("give exactly one query: an IMAGE file or --key KEY")
    attrs = _parse_filter(args.label, args.attr)
    with _client(args) as client:
        image = read_image_file(args.image, folder_hint=_FOLDER_HINT) if args.image else None

        def search(key: str | None) -> list[Hit]:
            return client.search(image=image, key=key, k=args.k, labels=args.label, attributes=attrs,
                                 nprobe=args.nprobe, ef_search=args.ef_search)

        try:
            try:
                hits = search(args.key)
            except NotFoundError as e:  # (only a key is looked up)
                for form in _other_spellings(args.key):
                    try:
                        hits = search(form)
                        break
                    except NotFoundError:
                        pass
                else:
                    raise e from None
        except ServerUnavailableError:  # not the image: the server
            raise
        except NotFoundError as e:
            raise NotFoundError(f"{e}; {_key_hint([args.key])}") from e
        except PictorError as e:  # as classify reports it: a bad image by its name
            if image is None:
                raise
            raise type(e)(f"{args.image}: {e}") from e
        no_such = _no_such_labels(client, args.label)
    rows = [f"{i + 1:>3}  {h.score:6.3f}  {_item_row(h)}" for i, h in enumerate(hits)]
    # Notes on stderr, as list writes them: the output stays the results.
    if hits and no_such:  # a typo among several labels: the hits are of the others
        print(f"pictor search: note: {no_such}", file=sys.stderr)
    elif not hits and not args.json:
        why = no_such or ("no indexed item matches the --label/--attr filter" if args.label or attrs
                          else "the index is empty")
        print(one_line(f"pictor search: no results: {why}"), file=sys.stderr)
    _emit(args, [dataclasses.asdict(h) for h in hits], "".join(f"{row}\n" for row in ["  #   score  key", *rows])
          if hits else "")
    return 0


@_guard_unreachable
def run_health(args: argparse.Namespace) -> int:
    """--json answers on stdout also when no server does (a script parses one thing either way)."""
    try:
        with _client(args, token=False) as client:
            status = client.health()
    except (ServerUnavailableError, ServerBusyError) as e:
        if args.json:
            _emit(args, {"health": "BUSY" if isinstance(e, ServerBusyError) else "UNREACHABLE",
                         "error": str(e)}, "")
        raise
    _emit(args, {"health": status}, f"{status}\n")
    return 0 if status == "SERVING" else EXIT_UNREACHABLE


@_guard_unreachable
def run_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
        status = client.health()
    d = {"health": status, **dataclasses.asdict(info)}
    names = info.class_names
    shown = ", ".join(map(_label_shown, names[:8])) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    rows = [
        ("health", status),
        ("backbone", f"{info.backbone} (weights: {info.weights}"
                     + (f", fine-tuned: {info.finetune})" if info.finetune else ")")),
        ("embedding", f"{info.embedding_dim}-d, "
                      + ("cosine (inner product of normalised vectors)" if info.metric == "ip" else info.metric)
                      + (f", {info.pooling} pooling" if info.pooling else "")
                      + (f" of layer {info.layer}" if info.layer else "")
                      + (f", PCA-whitened ({info.whitening}): Search and Upsert take vectors as Embed "
                         "returns them" if info.whitening else "")),
        ("index", f"{info.index_size} items, {info.index_type}"),
        ("labels", _label_counts_text(info.label_counts)),
        ("classifier", f"{info.classifier}: {shown}" if shown else f"{info.classifier} (the index's labels)"),
        *([("model", f"sha256 {info.model_sha256} (the --model file served; `sha256sum MODEL` to compare)")]
          if info.model_sha256 else []),
        ("open set", info.open_set or ("off: the model served has no open-set thresholds (trained with "
                                       "--no-open-set)" if info.classifier == "head" else
                                       "off (a model file from `pictor train`, served with --model, answers an "
                                       "image like none of its classes as unknown)")),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(info.versions.items()))),
    ]
    table = "".join(f"{name + ':':<14}{value}\n" for name, value in rows)
    _emit(args, d, table)
    return 0


def _label_counts_text(counts: dict[str, int], shown: int = 20) -> str:
    """``tulips 200, roses 180, ...``: the most common labels first."""
    if not counts:
        return "none"
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{_label_shown(label)} {n}" for label, n in ranked[:shown])
    return text + (f", ... ({len(ranked)} labels)" if len(ranked) > shown else "")


def _label_shown(label: str) -> str:
    """A label in a list of them: a table cell, also quoted where a comma or a quote in it could
    be misread there; no label is ``(none)``."""
    if not label:
        return "(none)"
    return repr(label) if any(c in label for c in ",'\"") or label == "(none)" else _table_cell(label)


@_guard_unreachable
def run_add(args: argparse.Namespace) -> int:
    from pictor.client.client import UpsertItem

    # A file named twice (`a.jpg ./a.jpg`) is one item, not one added and then replaced.
    paths = list({path_key(path): path for path in args.images}.values())
    _check_files_to_add(paths)
    attrs = _parse_attrs(args.attr)
    _utf8_text(args.label, "--label")
    _utf8_text(args.key_prefix, "--key-prefix")
    if args.key_prefix and "path" in attrs:
        raise InvalidRequestError("--attr path=... would replace the attribute `path` that --key-prefix keeps "
                                  "(each image's path); give yours another name")

    def attributes(path: str) -> dict[str, str]:
        # With a prefix the key is no longer the path: the path is kept beside it.
        return {"path": path_key(path), **attrs} if args.key_prefix else attrs

    def key(path: str) -> str:  # one slash where a prefix ending in / meets an absolute path
        prefix, rest = args.key_prefix, path_key(path)
        return prefix + (rest[1:] if prefix.endswith("/") and rest.startswith("/") else rest)

    # One call per server chunk, each all or nothing and within --timeout: a timeout that spans
    # every image would cap how many one command can add (about 350 in 30 s on 2 cores).
    inserted = replaced = added = 0
    with _client(args) as client:
        try:
            for batch in batched(paths, UPSERT_CHUNK):
                try:
                    done = client.upsert([UpsertItem(key=key(path), image=read_image_file(path), label=args.label,
                                                     attributes=attributes(path)) for path in batch])
                except BaseException as e:  # an error, or Ctrl-C: say what the earlier calls wrote
                    if added:
                        e.add_note(f"the calls before this one added the first {added} of the {len(paths)} images "
                                   f"({inserted} new, {replaced} replaced)")
                    if isinstance(e, KeyboardInterrupt):  # (an error says what its own call wrote)
                        e.add_note(f"the {len(batch)} of the call under way may have been added too; adding "
                                   "them all again is safe, keys replace")
                    raise
                inserted, replaced, added = inserted + done[0], replaced + done[1], added + len(batch)
                _progress(f"added {added} of {len(paths)} images")
        finally:
            _progress("")
    _emit(args, {"inserted": inserted, "replaced": replaced},
          f"added {inserted} new, replaced {replaced} existing\n")
    return 0


def _progress(text: str) -> None:
    """A progress line on a terminal, written over the last ("" clears it); none in a log or pipe."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[K{text}")
        sys.stderr.flush()


def _check_files_to_add(paths: Sequence[str]) -> None:
    """Refuse the files that cannot be added, all of them at once, before anything is sent:
    not halfway through the stream, nor one per run."""
    max_bytes = client_max_message_mb() * 2**20
    problems: list[PictorError] = []
    for path in paths:
        try:
            size = check_image_file(path, folder_hint=_FOLDER_HINT).stat().st_size
            if size > max_bytes:  # (an item is more than its image)
                raise ResourceExhaustedError(f"{path}: " + request_too_large(size, max_bytes, "this client's"))
            check_key_text(path)  # (bytes the shell passed on as they were)
        except PictorError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidRequestError(f"{len(problems)} of the {len(paths)} files cannot be added, so none was: "
                                  + "; ".join(map(str, problems)))


@_guard_unreachable
def run_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted, missing = client.delete(args.keys)

        def delete(forms: list[str]) -> list[str]:
            nonlocal deleted
            more, still = client.delete(forms)
            deleted += more
            return still

        missing = _found_otherwise(args.keys, missing, delete)
    _emit(args, {"deleted": deleted, "missing": missing}, f"deleted {deleted}\n")
    return _report_missing(args, missing)


@_guard_unreachable
def run_get(args: argparse.Namespace) -> int:
    items: list[StoredItem] = []
    with _client(args) as client:
        def get(keys: Sequence[str]) -> list[str]:
            """Look ``keys`` up, in calls of the most distinct keys a call takes; the missing ones."""
            missing: list[str] = []
            for chunk in batched(dict.fromkeys(keys), MAX_GET_KEYS):
                found, still = client.get(chunk, vectors=args.vectors)
                items.extend(found)
                missing.extend(still)
            return missing

        missing = _found_otherwise(args.keys, get(args.keys), get)
    position: dict[str, int] = {}  # the order asked, an item found by another spelling in its key's place
    for i, key in enumerate(args.keys):
        for form in (key, *_other_spellings(key)):
            position.setdefault(form, i)
    items.sort(key=lambda it: position.get(it.key, len(position)))
    rows = []
    for it in items:
        rows.append(_item_row(it))
        if it.vector is not None:
            rows.append("  vector: " + " ".join(f"{x:.6g}" for x in it.vector))
    if args.missing_ok:  # (without it, the error names them)
        rows.extend(f"{_table_cell(key)}  (not found)" for key in missing)
    _emit(args, {"items": items, "missing": missing}, "".join(f"{row}\n" for row in rows))
    return _report_missing(args, missing)


def _no_such_labels(client: PictorClient, labels: Sequence[str]) -> str:
    """What to say of the asked-for labels the index holds no item of ("" when none: it holds
    them all, or nothing was asked)."""
    held = client.info().label_counts if labels else {}
    unknown = [label for label in labels if canonical_label(label) not in held]  # as the index keeps them
    return (f"the index has no item labelled {', '.join(map(repr, unknown))} (labels: "
            f"{_label_counts_text(held)})") if held and unknown else ""


@_guard_unreachable
def run_list(args: argparse.Namespace) -> int:
    """Prints as it pages (a large index is not held in memory); --json: one object per line."""
    attrs = _parse_filter(args.label, args.attr)
    _utf8_text(args.after, "--after")
    last = None
    with _client(args) as client:
        try:
            for it in client.iter_items(labels=args.label, attributes=attrs, after=args.after):
                if args.json:
                    print(_json_line({"key": it.key, "label": it.label, "attributes": it.attributes}))
                else:
                    print(_item_row(it))
                last = it.key
        except (ServerUnavailableError, KeyboardInterrupt) as e:
            if last is not None:
                # (--after=KEY: a key that starts with "-" would read as an option)
                e.add_note(f"the listing stopped after the key printed last: to go on, run it again with "
                           f"--after={_shell_word(last)}")
            raise
        listed = last is not None
        no_such = _no_such_labels(client, args.label)  # (a typo: as search says it)
    # On stderr: the output stays a listing for scripts.
    if listed and no_such:
        print(f"pictor list: note: {no_such}", file=sys.stderr)
    elif not listed:
        filtered = args.label or attrs
        if no_such:
            why = no_such
        elif args.after:
            why = (f"no indexed item{' that matches the --label/--attr filter' if filtered else ''} has a key "
                   f"after {args.after!r} (keys are listed in code point order)")
        else:
            why = "no indexed item matches the --label/--attr filter" if filtered else "the index is empty"
        print(one_line(f"pictor list: no items: {why}"), file=sys.stderr)
    return 0


def _report_missing(args: argparse.Namespace, missing: Sequence[str]) -> int:
    """Exit code 2, with the keys named, for keys the index does not hold (0 with --missing-ok)."""
    if missing and not args.missing_ok:
        named = ", ".join(map(_table_cell, missing[:_MOST_NAMED]))
        if len(missing) > _MOST_NAMED:  # (a line of 10,000 keys buries the rest)
            named += f", ... ({len(missing) - _MOST_NAMED:,} more{'' if args.json else '; --json lists them all'})"
        print(f"pictor {args.command}: error: not found: {named} ({_key_hint(missing)})", file=sys.stderr)
        return 2
    return 0


def _shell_word(text: str) -> str:
    """``text`` as one word for a POSIX shell to pass on as it is: quoted, and with a line break
    or other control character, in bash's $'...' with it escaped (an error message is one line)."""
    if first_control_character(text) is None:
        return shlex.quote(text)
    return "$'" + "".join(f"\\u{ord(ch):04x}" if first_control_character(ch) else "\\" + ch if ch in "\\'" else ch
                          for ch in text) + "'"


def _other_spellings(key: str) -> list[str]:
    """How else an index may hold ``key``: in the form `pictor add` and `pictor index` store a
    path (photos/a.jpg for ./photos//a.jpg), and that in Unicode's composed and decomposed
    forms (a file copied from macOS is named "cafe" + a combining accent, which "café" typed
    is not): so that a path given to add, or a key as typed, is one to give to get and delete."""
    tidy = path_key(key)
    forms = (tidy, unicodedata.normalize("NFC", tidy), unicodedata.normalize("NFD", tidy))
    return [form for form in dict.fromkeys(forms) if form != key]


def _found_otherwise(keys: Sequence[str], missing: Sequence[str],
                     ask: Callable[[list[str]], Sequence[str]]) -> list[str]:
    """The keys of ``missing`` (of ``keys``, as the index answered) not held under another
    spelling either. ``ask`` looks spellings up and returns those missing too (for delete, it
    deletes the others). A key's spellings are asked in turn, up to the first held: a key names
    one item, even where the index holds two that look alike. A spelling asked already is not
    asked again (one item named two ways is one item)."""
    not_found = set(missing)
    held = {key: key not in not_found for key in keys}
    spellings = {key: _other_spellings(key) for key in missing}
    found: set[str] = set()
    for turn in range(max(map(len, spellings.values()), default=0)):
        forms = {key: s[turn] for key, s in spellings.items() if key not in found and turn < len(s)}
        if new := [form for form in dict.fromkeys(forms.values()) if form not in held]:
            not_held = set(ask(new))
            held.update((form, form not in not_held) for form in new)
        found.update(key for key, form in forms.items() if held[form])
    return [key for key in missing if key not in found]


def _key_hint(keys: Sequence[str]) -> str:
    """How an indexed file's key is written, shown on the first of ``keys`` written otherwise."""
    untidy = next((key for key in keys if path_key(key) != key), None)
    example = f"{_table_cell(path_key(untidy))} for {_table_cell(untidy)}" if untidy else "photos/a.jpg for ./photos//a.jpg"
    return (f"a key is the image's path as `pictor index` or `pictor add` stored it: {example}; "
            "`pictor list` shows keys")
