"""Routes of the Orthanc REST API: `POST /tools/find` and `POST /tools/lookup`.

Checked against Orthanc's source (OrthancRestResources.cpp `Find` and `Lookup`,
Search/DatabaseLookup.cpp, Search/DicomTagConstraint.cpp, ServerContext.cpp `Apply`,
ServerToolbox.cpp `NormalizeIdentifier`/`CheckValidLabel`) and the captured answers of
../shared/wire-samples/08-core-orthanc-api (invalid JSON, bad Level).

`/tools/find`, as Orthanc 1.12.4:

- the body must be a JSON object ("The body must contain a JSON object", 400/8); `Level` a string
  (400/8), then an Orthanc level (case-insensitive, plural and "Image" too: else 400/3 without
  details, as captured); `Query` an object (missing: no constraint); `CaseSensitive` a Boolean;
  `Limit`/`Since` integers (jsoncpp's int: at most 2^31-1 here, the bound of Orthanc 1.12.4's
  `asInt`; larger or non-integer numbers 400/8, negative ones 400/3); `RequestedTags`, `Labels`
  arrays of strings; `LabelsConstraint` "All" (default), "Any" or "None"; `Expand` read as
  jsoncpp's `asBool`; `Simplify`/`Short`/`Full` Booleans (400/15 otherwise) for the format of
  the expanded tags.
- each `Query` value must be a string (400/8); its key a tag ("gggg,eeee", "ggggeeee" or a
  dictionary name, else `UnknownDicomTag` 27: Orthanc answers it with 500, we with 400); an empty
  value is no constraint. As `DatabaseLookup::AddDicomConstraintInternal`: a DA/DT/TM value with
  '-' is a range (`lower-upper`, `-upper`, `lower-`), a value with '\\' a list, a value with '*'
  or '?' a wildcard match when the tag's VR allows it (AE CS LO LT PN SH ST UC UR UT), anything
  else an exact match; '*' or '?' elsewhere (a UID, a date) is "Wildcards are not allowed on
  tag ..." (400/3). `CaseSensitive` is false by default (the code, whatever the documentation
  says of `CaseSensitivePN`) and applies to every tag: both sides are upper-cased.
- matching follows `ServerContext::Apply`: when every constrained tag is a main DICOM tag, the
  values are the main tags of the resource and its ancestors (levels up to the query's: a tag of
  a lower level, such as Modality in a study query, matches nothing, as in 1.12.4); otherwise
  every constraint is matched against the top-level string tags of one instance of the resource
  (its file, read up to the pixel data). `ModalitiesInStudy` in a study query matches the
  Modality of any of its series. A tag absent or not a string never matches. `Since` skips
  matches, `Limit` (0: none) stops after that many, in the order resources arrived.
- ours, stricter: a DA value must be a date YYYYMMDD and a TM value a time (HH[MM[SS[.F]]]);
  range bounds may be partial (YYYY, YYYYMM): `-2020` is up to the end of 2020 (an upper bound
  compares on its own length; Orthanc compares strings, where "20200315" > "2020"). A malformed
  date or time is 400/8 (Orthanc would compare the strings and answer 200).
- answer: the IDs, or with `Expand` the resources as `GET /{level}/{id}` shows them (with
  `RequestedTags` when asked).

`/tools/lookup`: the body is the identifier (PatientID, StudyInstanceUID, SeriesInstanceUID or
SOPInstanceUID), compared as Orthanc's `LookupIdentifierExact` does on `NormalizeIdentifier`d
values (non-ASCII and control characters dropped, '%' and '_' as spaces, upper case, spaces
stripped): a JSON list of {ID, Path, Type}, patients first, then studies, series, instances. A
'*' or '?' in it is "Wildcards are not allowed" (400/3), as Orthanc's exact-match constraint.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api import core
from accelerator.api.http import json_answer, read_body
from accelerator.api.shapes import resource_json
from accelerator.api.tags import FULL, HUMAN, SHORT, file_strings, format_tag, parse_tag, tag_vr
from accelerator.store import Store
from accelerator.store.dicom import MAIN_TAGS
from protocol.errors import BadFileFormat, BadRequest, ParameterOutOfRange
from protocol.resources import Level

MAX_BODY = 1024 * 1024  # a find or lookup body; larger is 413
INT_MAX = 2**31 - 1  # jsoncpp's Int: what Orthanc 1.12.4 reads Limit and Since with
MODALITIES_IN_STUDY = 0x00080061
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "DT", "TM"})
_MAIN_LEVELS: dict[str, set[Level]] = {}
for _level, _names in MAIN_TAGS.items():
    for _name in _names:
        _MAIN_LEVELS.setdefault(_name, set()).add(_level)
_IDENTIFIERS = ((Level.PATIENT, "PatientID", 0x00100020), (Level.STUDY, "StudyInstanceUID", 0x0020000D),
                (Level.SERIES, "SeriesInstanceUID", 0x0020000E), (Level.INSTANCE, "SOPInstanceUID", 0x00080018))
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DATE = re.compile(r"[0-9]{4}(?:[0-9]{2}(?:[0-9]{2})?)?")
_TIME = re.compile(r"(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?")


# -- constraints -------------------------------------------------------------------------------

def wildcard_match(pattern: str, text: str) -> bool:
    """'*' any run, '?' one character, the whole text: O(len(pattern) * len(text)) at worst,
    never the exponential backtracking of a regular expression."""
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] != "*" and (pattern[p] == "?" or pattern[p] == text[t]):
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


@dataclass
class Constraint:
    """One `DicomTagConstraint` (a range is its two bounds in one)."""

    tag: int
    kind: str  # "equal", "list", "wildcard", "range"
    values: tuple[str, ...] = ()
    lower: str = ""
    upper: str = ""
    case_sensitive: bool = False

    def __post_init__(self) -> None:
        norm = self._norm
        self.values = tuple(norm(v) for v in self.values)
        self.lower, self.upper = norm(self.lower), norm(self.upper)

    def _norm(self, text: str) -> str:
        return text if self.case_sensitive else text.upper()

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) or ""

    def matches(self, value: str | None) -> bool:
        if value is None:  # absent, binary or too long: a mandatory constraint fails
            return False
        value = self._norm(value)
        if self.kind == "equal":
            return value == self.values[0]
        if self.kind == "list":
            return value in self.values
        if self.kind == "wildcard":
            return wildcard_match(self.values[0], value)
        if self.lower and value < self.lower:
            return False
        return not self.upper or value[: len(self.upper)] <= self.upper


def _check_no_wildcard(tag: int, value: str) -> None:
    if "*" in value or "?" in value:  # DicomTagConstraint::AssignSingleValue
        raise ParameterOutOfRange(f"Wildcards are not allowed on tag {format_tag(tag)}")


def _valid_date(text: str, partial: bool) -> bool:
    if not _DATE.fullmatch(text) or (not partial and len(text) != 8):
        return False
    year, month, day = int(text[:4]), int(text[4:6] or 1), int(text[6:8] or 1)
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


def _check_temporal(tag: int, vr: str, value: str, bound: bool) -> None:
    if vr == "DA" and not _valid_date(value, bound):
        raise BadRequest(f"Tag {format_tag(tag)} takes a date YYYYMMDD or a range of dates "
                         f"(20200101-20201231, -2020, 2020-), got {value!r}")
    if vr == "TM" and not _TIME.fullmatch(value):
        raise BadRequest(f"Tag {format_tag(tag)} takes a time HHMMSS (or HH, HHMM, HHMMSS.FFFFFF) "
                         f"or a range of times, got {value!r}")


def make_constraint(tag: int, value: str, case_sensitive: bool) -> Constraint:
    """`DatabaseLookup::AddDicomConstraintInternal`, with our date and time checks."""
    vr = tag_vr(tag) or ""
    if vr in _RANGE_VRS and "-" in value:
        lower, _, upper = value.partition("-")
        for bound in (lower, upper):
            _check_no_wildcard(tag, bound)
            if bound:
                _check_temporal(tag, vr, bound, True)
        return Constraint(tag, "range", lower=lower, upper=upper, case_sensitive=case_sensitive)
    if "\\" in value:
        items = tuple(value.split("\\"))
        for item in items:
            if item:
                _check_temporal(tag, vr, item, False)
        return Constraint(tag, "list", items, case_sensitive=case_sensitive)
    if vr in _WILDCARD_VRS and ("*" in value or "?" in value):
        return Constraint(tag, "wildcard", (value,), case_sensitive=case_sensitive)
    _check_no_wildcard(tag, value)
    _check_temporal(tag, vr, value, False)
    return Constraint(tag, "equal", (value,), case_sensitive=case_sensitive)


# -- the request -------------------------------------------------------------------------------

@dataclass
class FindRequest:
    level: Level
    constraints: list[Constraint] = field(default_factory=list)
    modalities: Constraint | None = None  # ModalitiesInStudy of a study query
    expand: bool = False
    fmt: str = HUMAN
    limit: int = 0
    since: int = 0
    requested_tags: list[str] | None = None
    labels: list[str] = field(default_factory=list)
    labels_constraint: str = "All"


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float (jsoncpp's intValue)


def _as_bool(name: str, value: Any) -> bool:
    """jsoncpp's `asBool`: null, Booleans and numbers; anything else is an error."""
    if value is None or isinstance(value, (bool, int, float)):
        return bool(value)
    raise BadRequest(f'Field "{name}" must be a Boolean')


def _read_boolean(body: dict[str, Any], name: str) -> bool:
    """`SerializationToolbox::ReadBoolean`."""
    if name not in body:
        return False
    if not isinstance(body[name], bool):
        raise BadFileFormat(f"Boolean value expected in field: {name}")
    return body[name]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def parse_body(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def parse_find(raw: bytes) -> FindRequest:
    body = parse_body(raw)
    if not isinstance(body, dict):
        raise BadRequest("The body must contain a JSON object")
    if not isinstance(body.get("Level"), str):
        raise BadRequest('Field "Level" is missing, or should be a string')
    query = body.get("Query", {})
    if not isinstance(query, dict):
        raise BadRequest('Field "Query" is missing, or should be a JSON object')
    if "CaseSensitive" in body and not isinstance(body["CaseSensitive"], bool):
        raise BadRequest('Field "CaseSensitive" must be a Boolean')
    for name in ("Limit", "Since"):
        if name in body and not (_is_int(body[name]) and body[name] <= INT_MAX):
            raise BadRequest(f'Field "{name}" must be an integer (at most {INT_MAX})')
    for name in ("RequestedTags", "Labels"):
        if name in body and not isinstance(body[name], list):
            raise BadRequest(f'Field "{name}" must be an array')
    if "LabelsConstraint" in body and not isinstance(body["LabelsConstraint"], str):
        raise BadRequest('Field "LabelsConstraint" must be a string')
    expand = _as_bool("Expand", body.get("Expand"))
    try:
        level = Level.parse(body["Level"])
    except ParameterOutOfRange:
        raise ParameterOutOfRange() from None  # as captured: no details
    fmt = HUMAN if _read_boolean(body, "Simplify") else SHORT if _read_boolean(body, "Short") \
        else FULL if _read_boolean(body, "Full") else HUMAN
    for name in ("Limit", "Since"):
        if body.get(name, 0) < 0:
            raise ParameterOutOfRange(f'Field "{name}" must be a positive integer')
    request = FindRequest(level, expand=expand, fmt=fmt, limit=body.get("Limit", 0), since=body.get("Since", 0))
    case_sensitive = body.get("CaseSensitive", False)
    for key in sorted(query):  # jsoncpp's getMemberNames order
        value = query[key]
        if not isinstance(value, str):
            raise BadRequest(f'Tag "{key}" must be associated with a string')
        tag = parse_tag(key)
        if not value:
            continue  # universal constraint
        constraint = make_constraint(tag, value, case_sensitive)
        if tag == MODALITIES_IN_STUDY and level == Level.STUDY:
            request.modalities = constraint
        else:
            request.constraints.append(constraint)
    if "RequestedTags" in body:
        names = body["RequestedTags"]
        for name in names:
            if not isinstance(name, str):
                raise BadRequest('Field "RequestedTags" must contain strings')
            parse_tag(name)
        request.requested_tags = list(names)
    for label in body.get("Labels", []):
        if not isinstance(label, str):
            raise BadRequest('Field "Labels" must contain strings')
        if not _LABEL.fullmatch(label):
            raise ParameterOutOfRange("A label must be a non-empty, alphanumeric string, possibly with '_' or "
                                      f"'-' characters, with maximum 64 characters, but got: {label}")
        request.labels.append(label)
    constraint_name = body.get("LabelsConstraint", "All")
    if constraint_name not in ("All", "Any", "None"):
        raise BadRequest('Field "LabelsConstraint" must be "All", "Any", or "None"')
    request.labels_constraint = constraint_name
    return request


# -- the search --------------------------------------------------------------------------------

def _labels_match(request: FindRequest, labels: set[str]) -> bool:
    if not request.labels:
        return True
    wanted = set(request.labels)
    if request.labels_constraint == "All":
        return wanted <= labels
    if request.labels_constraint == "Any":
        return bool(wanted & labels)
    return not wanted & labels


def _study_modalities(store: Store) -> dict[int, set[str]]:
    modalities: dict[int, set[str]] = {}
    for _, _, parent, tags in store.index.scan(Level.SERIES):
        if "Modality" in tags and parent is not None:
            modalities.setdefault(parent, set()).add(tags["Modality"])
    return modalities


def _ancestor_tags(store: Store, level: Level, needed: set[Level]) -> Callable[[int | None], dict[str, str]]:
    """A function giving the main tags of a resource's ancestors (levels in `needed`), from maps
    of the levels between (only those: a patient query builds none)."""
    if not needed:
        return lambda parent: {}
    maps = {lvl: {row: (parent, tags) for row, _, parent, tags in store.index.scan(lvl)}
            for lvl in Level if min(needed) <= lvl < level}

    def tags_of(parent: int | None) -> dict[str, str]:
        merged: dict[str, str] = {}
        for lvl in reversed(range(min(needed), level)):
            if parent is None:
                break
            parent_row, tags = maps[Level(lvl)].get(parent, (None, {}))
            for key, value in tags.items():
                merged.setdefault(key, value)
            parent = parent_row
        return merged

    return tags_of


def run_find(store: Store, request: FindRequest) -> list[Any]:
    level = request.level
    constraints = request.constraints
    main_only = all(c.keyword in _MAIN_LEVELS for c in constraints)
    # Main tags a resource can match on: those of its level and above (ServerContext::Apply).
    usable = [c for c in constraints if c.keyword in _MAIN_LEVELS and min(_MAIN_LEVELS[c.keyword]) <= level]
    needed = {lvl for c in usable for lvl in _MAIN_LEVELS[c.keyword] if lvl < level}
    ancestors = _ancestor_tags(store, level, needed)
    labels = store.index.labels_at(level) if request.labels else {}
    modalities = _study_modalities(store) if request.modalities else {}
    found: list[str] = []
    skipped = 0
    if main_only and len(usable) != len(constraints):
        return []  # a main tag of a lower level only: absent at this level, nothing matches
    for row, public_id, parent, tags in store.index.scan(level):
        if not _labels_match(request, labels.get(row, set())):
            continue
        if request.modalities and not any(request.modalities.matches(m) for m in modalities.get(row, ())):
            continue
        values = {**ancestors(parent), **tags} if needed else tags
        if not all(c.matches(values.get(c.keyword)) for c in usable):
            continue  # also Orthanc's database pre-filter when some tags are not main ones
        if not main_only:
            instances = store.index.descendants(store.resource(level, public_id), Level.INSTANCE)
            strings = file_strings(store, instances[0]) if instances else {}
            if not all(c.matches(strings.get(c.tag)) for c in constraints):
                continue
        if skipped < request.since:
            skipped += 1
            continue
        found.append(public_id)
        if request.limit and len(found) >= request.limit:
            break
    if not request.expand:
        return found
    return [_expanded(store, level, public_id, request) for public_id in found]


def _formatted_tags(tags: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == HUMAN:
        return tags
    answer: dict[str, Any] = {}
    for name, value in tags.items():
        tag = tag_for_keyword(name)
        key = format_tag(tag) if tag is not None else name
        answer[key] = value if fmt == SHORT else {"Name": name, "Type": "String", "Value": value}
    return answer


def _expanded(store: Store, level: Level, public_id: str, request: FindRequest) -> dict[str, Any]:
    answer = resource_json(store, store.resource(level, public_id), request.requested_tags)
    for key in ("MainDicomTags", "PatientMainDicomTags", "RequestedTags"):
        if key in answer:
            answer[key] = _formatted_tags(answer[key], request.fmt)
    return answer


# -- lookup ------------------------------------------------------------------------------------

def normalize_identifier(value: str) -> str:
    """`ServerToolbox::NormalizeIdentifier`."""
    kept = []
    for char in value:
        if char in "%_":
            kept.append(" ")
        elif char.isascii() and char.isprintable():
            kept.append(char)
    return "".join(kept).upper().strip()


def run_lookup(store: Store, identifier: str) -> list[dict[str, str]]:
    wanted = normalize_identifier(identifier)
    answer = []
    for level, keyword, _ in _IDENTIFIERS:
        for public_id, value in store.index.main_tag_values(level, keyword):
            if value is not None and normalize_identifier(value) == wanted:
                answer.append({"ID": public_id, "Path": f"/{level.plural}/{public_id}", "Type": level.title})
    return answer


# -- routes ------------------------------------------------------------------------------------

async def post_find(request: Request) -> Response:
    raw = await read_body(request, MAX_BODY)
    find = parse_find(raw)
    store = request.app.state.store
    return json_answer(await to_thread.run_sync(run_find, store, find))


async def post_lookup(request: Request) -> Response:
    raw = await read_body(request, MAX_BODY)
    identifier = raw.decode("utf-8", "replace")
    if "*" in identifier or "?" in identifier:
        raise ParameterOutOfRange(f"Wildcards are not allowed on tag {format_tag(_IDENTIFIERS[0][2])}")
    store = request.app.state.store
    return json_answer(await to_thread.run_sync(run_lookup, store, identifier))


def routes() -> list[Route]:
    return [
        core.route("/tools/find", POST=post_find),
        core.route("/tools/lookup", POST=post_lookup),
    ]
