"""Readers: the json layout, RecBole atomic files and raw Amazon 2023, on real and broken files."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from megarec.data.domain import DataError, MissingTextError
from megarec.data.readers import detect_format, read_domain
from megarec.data.readers.json_layout import write
from megarec.data.sample import SAMPLE_DIR, load_sample, sample_paths


def seqs_by_raw_id(domain) -> dict[str, list[str]]:
    return {u: [domain.item_ids[i] for i in s.tolist()] for u, s in zip(domain.users, domain.sequences)}


# =========================================================================== json layout
def write_json_layout(folder: Path, name: str, inter, items=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter.json").write_text(json.dumps(inter))
    if items is not None:
        (folder / f"{name}.item.json").write_text(json.dumps(items))
    return folder


def test_json_layout_on_the_embedded_sample():
    domains = load_sample()
    assert [d.name for d in domains] == ["Scientific", "Office", "Games"]
    for path, d in zip(sample_paths(), domains):
        raw = json.loads((path / f"{d.name}.inter.json").read_text())
        items = json.loads((path / f"{d.name}.item.json").read_text())
        assert d.users == list(raw)
        assert seqs_by_raw_id(d) == {u: [str(i) for i in s] for u, s in raw.items()}
        assert d.num_items == len(items) and d.item_ids == list(items)
        assert d.item_text[0] == items[d.item_ids[0]]
        assert d.text(0).startswith(items[d.item_ids[0]]["title"])
        assert all(len(s) >= 5 for s in d.sequences)
        assert d.item_image is None


def test_json_layout_item_order_follows_item_file(tmp_path):
    inter = {"u1": ["b", "a", "c"], "u2": ["c", "b"]}
    items = {"c": {"title": "C"}, "x": {"title": "unused"}, "a": {"title": "A", "brand": "Acme"},
             "b": {"title": "B", "categories": ["toys", "kids"]}}
    d = read_domain(write_json_layout(tmp_path / "Toys", "Toys", inter, items))
    assert d.name == "Toys" and d.users == ["u1", "u2"]
    assert d.item_ids == ["c", "a", "b"]  # item file order, unused "x" dropped
    assert [s.tolist() for s in d.sequences] == [[2, 1, 0], [0, 2]]
    assert d.text(1) == "A Acme" and d.text(2) == "B toys kids"
    assert d.stats()["interactions"] == 5


def test_json_layout_without_item_file_has_no_text(tmp_path):
    inter = {"7": [3, 1, 3, 2], "8": [1, 2, 4, 5, 6]}
    folder = write_json_layout(tmp_path / "Instruments", "Instruments", inter)
    d = read_domain(folder / "Instruments.inter.json")
    assert d.item_text is None and not d.has_text
    assert d.item_ids == ["3", "1", "2", "4", "5", "6"]  # first appearance
    assert seqs_by_raw_id(d) == {"7": ["3", "1", "3", "2"], "8": ["1", "2", "4", "5", "6"]}
    with pytest.raises(MissingTextError, match="TIGER needs item text.*'Instruments'"):
        d.require_text("TIGER")


def test_json_layout_text_fields_and_name(tmp_path):
    items = {"0": {"title": "T0", "description": "D0", "brand": "B0"}, "1": {"title": "T1", "description": "", "brand": "B1"}}
    folder = write_json_layout(tmp_path / "x", "Shop", {"u": [0, 1]}, items)
    d = read_domain(folder, text_fields=["description", "title"], name="Other")
    assert d.name == "Other"
    assert d.item_text == [{"description": "D0", "title": "T0"}, {"description": "", "title": "T1"}]
    assert d.texts() == ["D0 T0", "T1"]
    with pytest.raises(DataError, match=r"Shop\.item\.json: item '0': missing field 'color'"):
        read_domain(folder, text_fields=["title", "color"])


def test_json_layout_write_round_trip(tmp_path):
    d = load_sample()[1]
    write(d, tmp_path / "copy")
    e = read_domain(tmp_path / "copy")
    assert (e.name, e.users, e.item_ids, e.item_text) == (d.name, d.users, d.item_ids, d.item_text)
    assert all(np.array_equal(a, b) for a, b in zip(d.sequences, e.sequences))


@pytest.mark.parametrize("inter_text, items, match", [
    ("", None, r"D\.inter\.json: empty file"),
    ("  \n", None, r"D\.inter\.json: empty file"),
    ('{"u1": [1, 2],\n "u2": [3, 4\n}', None, r"D\.inter\.json:3:1: broken JSON"),
    ("[[1, 2]]", None, r"D\.inter\.json: top level must be an object"),
    ("{}", None, r"D\.inter\.json: no users"),
    ('{"u1": 5}', None, r"D\.inter\.json: user 'u1': expected a list"),
    ('{"u1": [1, 2.5]}', None, r"D\.inter\.json: user 'u1': item ids must be integers or strings, got 2\.5"),
    ('{"u1": [1, 2], "u2": [2, 9]}', {"1": {"title": "a"}, "2": {"title": "b"}},
     r"D\.inter\.json: user 'u2': item '9' has no record in .*D\.item\.json"),
    ('{"u1": [1]}', {"1": "just a title"}, r"D\.item\.json: item '1': expected an object"),
    ('{"u1": [1]}', "", r"D\.item\.json: empty file"),
    ('{"u1": [1]}', {"1": {"name": "x", "price": 3}}, r"D\.item\.json: no item has any of the default text "
     r"fields title, brand, categories, description; .* \(found: name, price\)"),
])
def test_json_layout_errors(tmp_path, inter_text, items, match):
    (tmp_path / "D.inter.json").write_text(inter_text)
    if items is not None:
        (tmp_path / "D.item.json").write_text(items if isinstance(items, str) else json.dumps(items))
    with pytest.raises(DataError, match=match):
        read_domain(tmp_path)


# =========================================================================== RecBole atomic files
RECBOLE_INTER = (
    "rating:float\titem_id:token\tuser_id:token\ttimestamp:float\treview:token_seq\n"
    "5.0\ti3\tu1\t300\tgreat stuff\n"
    "4.0\ti1\tu2\t50\tok\n"
    "3.0\ti1\tu1\t100\tmeh\n"
    "\n"
    "5.0\ti2\tu1\t300\ttie with i3, later in the file\n"
    "1.0\ti3\tu2\t10\tbad\n"
    "2.0\ti1\tu1\t5e2\tagain\n"
)
RECBOLE_ITEM = (
    "item_id:token\ttitle:token_seq\tprice:float\tbrand:token\tcategories:token_seq\n"
    "i1\tRed   Widget 3000\t9.99\tAcme\tTools Hand\n"
    "i2\tBlue Gadget\t1.5\t\tToys\n"
    "i3\tGreen Thing\t3\tGreenCo\tGarden\n"
    "i9\tNever Bought\t1\tX\tY\n"
)


def write_recbole(folder: Path, name="Tools", inter=RECBOLE_INTER, item: str | None = RECBOLE_ITEM) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text(inter)
    if item is not None:
        (folder / f"{name}.item").write_text(item)
    return folder


def test_recbole_sequences_sorted_by_timestamp_stable(tmp_path):
    d = read_domain(write_recbole(tmp_path / "Tools"))
    assert detect_format(tmp_path / "Tools")[0] == "recbole"
    assert d.name == "Tools" and d.users == ["u1", "u2"]
    # u1: i1@100, then i3@300 and i2@300 in file order, then i1@500 (repeat kept); u2: i3@10, i1@50.
    assert seqs_by_raw_id(d) == {"u1": ["i1", "i3", "i2", "i1"], "u2": ["i3", "i1"]}
    assert d.item_ids == ["i1", "i2", "i3"]  # item file order; i9 has no interaction
    # default text: every token/token_seq column in column order; token_seq spaces normalised
    assert d.text_fields == ["title", "brand", "categories"]
    assert d.item_text[0] == {"title": "Red Widget 3000", "brand": "Acme", "categories": "Tools Hand"}
    assert d.text(1) == "Blue Gadget Toys"


def test_recbole_text_fields_and_inter_only(tmp_path):
    d = read_domain(write_recbole(tmp_path / "Tools") / "Tools.inter", text_fields=["categories", "title"])
    assert d.item_text[2] == {"categories": "Garden", "title": "Green Thing"}
    assert d.text(2) == "Garden Green Thing"
    e = read_domain(write_recbole(tmp_path / "Bare", name="Bare", item=None))
    assert e.item_text is None and e.item_ids == ["i3", "i1", "i2"]  # first appearance in the inter file
    assert seqs_by_raw_id(e) == {"u1": ["i1", "i3", "i2", "i1"], "u2": ["i3", "i1"]}


@pytest.mark.parametrize("inter, item, text_fields, match", [
    ("", None, None, r"T\.inter: empty file"),
    ("user_id:token\titem_id:token\n" "u\ti\t\n", None, None, r"T\.inter:1: missing required column 'timestamp'"),
    ("user_id:token\titem:token\ttimestamp:float\n", None, None, r"T\.inter:1: missing required column 'item_id'"),
    ("user_id:token\titem_id\ttimestamp:float\n", None, None, r"T\.inter:1: column 'item_id' is not 'name:type'"),
    ("user_id:token\titem_id:token\ttimestamp:float\n", None, None, r"T\.inter: no interactions"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\n", None, None,
     r"T\.inter:3: 2 columns, the header has 3"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\tnoon\n", None, None,
     r"T\.inter:3: timestamp 'noon' is not a number"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\nu\ti7\t2\n", "item_id:token\ttitle:token_seq\ni1\tx\n",
     None, r"T\.inter:3: item 'i7' has no record in .*T\.item"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\n", "item_id:token\ttitle:token_seq\ni1\tx\ni1\ty\n",
     None, r"T\.item:3: item 'i1' repeated \(first on line 2\)"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\n", "title:token_seq\nx\n", None,
     r"T\.item:1: missing required column 'item_id'"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\n", "item_id:token\ttitle:token_seq\tprice:float\n"
     "i1\tx\t1\n", ["title", "price"], r"T\.item:1: column 'price' is float, not a text"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\n", "item_id:token\ttitle:token_seq\ni1\tx\n",
     ["description"], r"T\.item:1: no column 'description' for the item text \(text columns: title\)"),
])
def test_recbole_errors(tmp_path, inter, item, text_fields, match):
    write_recbole(tmp_path, name="T", inter=inter, item=item)
    with pytest.raises(DataError, match=match):
        read_domain(tmp_path / "T.inter", text_fields=text_fields)


# =========================================================================== raw Amazon Reviews 2023
def review(user: str, item: str, ts: int, rating: float = 5.0) -> dict:
    """A review line in the real Amazon Reviews 2023 schema."""
    return {"rating": rating, "title": "Nice", "text": "Works as described.", "images": [],
            "asin": item + "-v", "parent_asin": item, "user_id": user, "timestamp": ts,
            "helpful_vote": 0, "verified_purchase": True}


def meta(item: str, n_images: int = 1) -> dict:
    """A meta line in the real Amazon Reviews 2023 schema."""
    images = [{"thumb": f"https://img.example/{item}_{k}_t.jpg", "large": f"https://img.example/{item}_{k}_l.jpg",
               "hi_res": None if k else f"https://img.example/{item}_{k}_h.jpg", "variant": "MAIN" if k == 0 else "PT01"}
              for k in range(n_images)]
    return {"main_category": "Industrial & Scientific", "title": f"Product {item}", "average_rating": 4.5,
            "rating_number": 12, "features": [f"{item} feature one", f"{item} feature two"],
            "description": [f"About {item}."], "price": 9.99, "images": images, "videos": [], "store": "Acme",
            "categories": ["Industrial & Scientific", f"Cat {item}"], "details": {"Brand": "Acme"},
            "parent_asin": item, "bought_together": None}


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def random_reviews(seed: int, users: int = 60, items: int = 25, n: int = 700) -> list[dict]:
    rng = np.random.default_rng(seed)
    # skewed popularity so filtering removes some users and items over several passes
    p = 1.0 / np.arange(1, items + 1) ** 1.2
    rows = []
    for _ in range(n):
        u = int(rng.integers(users) ** 2 // users)  # skewed activity too
        rows.append(review(f"U{u}", f"B{int(rng.choice(items, p=p / p.sum())):03d}", int(rng.integers(0, 50)) * 1000))
    return rows


def naive_kcore_sequences(rows: list[dict], k: int) -> dict[str, list[str]]:
    """Reference: drop (user, item) rows of rare users/items until stable; chronological, stable for ties."""
    rows = list(rows)
    while True:
        users, items = {}, {}
        for r in rows:
            users[r["user_id"]] = users.get(r["user_id"], 0) + 1
            items[r["parent_asin"]] = items.get(r["parent_asin"], 0) + 1
        kept = [r for r in rows if users[r["user_id"]] >= k and items[r["parent_asin"]] >= k]
        if len(kept) == len(rows):
            break
        rows = kept
    out: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        out.setdefault(r["user_id"], []).append((r["timestamp"], r["parent_asin"]))
    return {u: [i for _, i in sorted(v, key=lambda x: x[0])] for u, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_amazon2023_kcore_and_order_match_a_naive_reference(tmp_path, seed):
    rows = random_reviews(seed)
    write_jsonl(tmp_path / "Industrial_and_Scientific.jsonl", rows)
    d = read_domain(tmp_path)  # default 5-core
    expected = naive_kcore_sequences(rows, 5)
    assert d.name == "Industrial_and_Scientific" and d.num_users > 5
    assert seqs_by_raw_id(d) == expected
    counts = np.bincount(np.concatenate(d.sequences), minlength=d.num_items)
    assert counts.min() >= 5 and min(len(s) for s in d.sequences) >= 5
    raw = read_domain(tmp_path, kcore=0)
    assert raw.num_interactions == len(rows)
    assert read_domain(tmp_path, kcore=3).num_interactions > d.num_interactions


def test_amazon2023_kcore_repeats_until_stable(tmp_path):
    # U0..U4 review A..E (a 5-core). F has V's review only; G has V's and W1..W4's. Dropping F
    # leaves V with 4 -> V goes -> G has 4 -> G goes -> W1..W4 have 4 -> they go: four rounds.
    rows = [review(f"U{u}", it, 10 * u + j) for u in range(5) for j, it in enumerate("ABCDE")]
    rows += [review("V", it, 100 + j) for j, it in enumerate("ABCFG")]
    rows += [review(f"W{w}", it, 200 + j) for w in range(1, 5) for j, it in enumerate("ABCDG")]
    write_jsonl(tmp_path / "Toys.jsonl", rows)
    d = read_domain(tmp_path / "Toys.jsonl")
    assert sorted(d.users) == [f"U{u}" for u in range(5)]
    assert sorted(d.item_ids) == list("ABCDE")
    assert seqs_by_raw_id(d) == naive_kcore_sequences(rows, 5)
    assert read_domain(tmp_path / "Toys.jsonl", kcore=4).num_users == 10  # V goes (F); G keeps 4


def test_amazon2023_text_images_repeats_and_gzip(tmp_path):
    rows = [review(f"U{u}", f"I{(u + j) % 6}", 1000 * j) for u in range(8) for j in range(6)]
    rows.append(review("U0", "I0", 10**7))  # a repeated (user, item) review is kept
    metas = [meta(f"I{i}", n_images=0 if i == 3 else 2) for i in range(6)] + [meta("UNREVIEWED")]
    metas[5]["images"] = [{"thumb": "t.jpg", "large": None, "hi_res": None, "variant": "MAIN"},
                          {"thumb": "t2.jpg", "large": "https://img.example/second.jpg", "variant": "PT01"}]
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "Toys.jsonl", rows)
    write_jsonl(plain / "meta_Toys.jsonl", metas)
    d = read_domain(plain)
    assert seqs_by_raw_id(d)["U0"] == ["I0", "I1", "I2", "I3", "I4", "I5", "I0"]
    assert d.num_interactions == len(rows)
    k = d.item_ids.index("I2")
    assert d.item_text[k] == {"title": "Product I2", "features": "I2 feature one I2 feature two",
                              "categories": "Industrial & Scientific, Cat I2"}
    assert d.text(k) == "Product I2 I2 feature one I2 feature two Industrial & Scientific, Cat I2"
    assert d.item_image[k] == "https://img.example/I2_0_l.jpg"
    assert d.item_image[d.item_ids.index("I3")] is None
    assert d.item_image[d.item_ids.index("I5")] == "https://img.example/second.jpg"
    assert "UNREVIEWED" not in d.item_ids

    gz = tmp_path / "gz"
    gz.mkdir()
    write_jsonl(gz / "Toys.jsonl", rows, gz=True)
    write_jsonl(gz / "meta_Toys.jsonl", metas, gz=True)
    for path in (gz, gz / "Toys.jsonl.gz", gz / "meta_Toys.jsonl.gz"):
        e = read_domain(path)
        assert (e.name, e.users, e.item_ids, e.item_text, e.item_image) == \
            (d.name, d.users, d.item_ids, d.item_text, d.item_image)
        assert all(np.array_equal(a, b) for a, b in zip(d.sequences, e.sequences))

    f = read_domain(plain, text_fields=["title", "description", "store"])
    assert f.text(k) == "Product I2 About I2. Acme"
    with pytest.raises(DataError, match="no text field 'brand'.*choose from title, features"):
        read_domain(plain, text_fields=["brand"])


def test_amazon2023_without_meta_has_no_text(tmp_path):
    write_jsonl(tmp_path / "Toys.jsonl", [review(f"U{u}", f"I{j}", j) for u in range(5) for j in range(5)])
    d = read_domain(tmp_path)
    assert d.item_text is None and d.item_image is None and d.num_interactions == 25


def _good_rows() -> list[dict]:
    return [review(f"U{u}", f"I{j}", j) for u in range(5) for j in range(5)]


@pytest.mark.parametrize("lines, meta_lines, match", [
    (["{}"], None, r"Toys\.jsonl:1: missing required field 'timestamp'"),
    ([json.dumps(review("U1", "I1", 1)), json.dumps({"user_id": "U1", "timestamp": 5})], None,
     r"Toys\.jsonl:2: missing required field 'parent_asin'"),
    ([json.dumps(review("U1", "I1", 1)), "", '{"user_id": "U1", "parent_asin": "I2", "timestamp": 5'], None,
     r"Toys\.jsonl:3: broken JSON line"),
    ([json.dumps(review("U1", "I1", "yesterday"))], None, r"Toys\.jsonl:1: timestamp 'yesterday' is not a number"),
    (["[1, 2]"], None, r"Toys\.jsonl:1: expected a JSON object"),
    ([], None, r"Toys\.jsonl: empty file"),
    ([json.dumps(r) for r in _good_rows()], [json.dumps(meta(f"I{j}")) for j in range(4)],
     r"Toys\.jsonl:5: item 'I4' has no record in .*meta_Toys\.jsonl \(1 items without one\)"),
    ([json.dumps(r) for r in _good_rows()], [json.dumps(meta(f"I{j}")) for j in range(5)] + ["{oops"],
     r"meta_Toys\.jsonl:6: broken JSON line"),
    ([json.dumps(r) for r in _good_rows()], [json.dumps(meta("I0")), json.dumps({"title": "x"})],
     r"meta_Toys\.jsonl:2: missing required field 'parent_asin'"),
    ([json.dumps(r) for r in _good_rows()], [json.dumps(meta(f"I{j}")) for j in range(5)] + [json.dumps(meta("I2"))],
     r"meta_Toys\.jsonl:6: item 'I2' repeated \(first on line 3\)"),
    ([json.dumps(review("U1", "I1", 1))], None, r"Toys\.jsonl: no user is left after 5-core filtering"),
])
def test_amazon2023_errors(tmp_path, lines, meta_lines, match):
    (tmp_path / "Toys.jsonl").write_text("".join(line + "\n" for line in lines))
    if meta_lines is not None:
        (tmp_path / "meta_Toys.jsonl").write_text("".join(line + "\n" for line in meta_lines))
    with pytest.raises(DataError, match=match):
        read_domain(tmp_path)


def test_amazon2023_truncated_gzip_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "Toys.jsonl", _good_rows(), gz=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"Toys\.jsonl\.gz"):
        read_domain(path)


# =========================================================================== detection
def test_detection_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_domain(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unknown data format.*inter\.json.*RecBole.*Amazon"):
        read_domain(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="unknown data format"):
        read_domain(tmp_path)
    write_json_layout(tmp_path / "two", "A", {"u": [1]})
    write_json_layout(tmp_path / "two", "B", {"u": [1]})
    with pytest.raises(DataError, match=r"several interaction files \(A\.inter\.json, B\.inter\.json\)"):
        read_domain(tmp_path / "two")
    assert read_domain(tmp_path / "two" / "B.inter.json").name == "B"
    with pytest.raises(DataError, match="kcore must be >= 0"):
        read_domain(tmp_path / "two" / "B.inter.json", kcore=-1)


def test_detected_formats(tmp_path):
    write_json_layout(tmp_path / "j", "j", {"u": [1]})
    write_recbole(tmp_path / "r")
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "Cat.jsonl", _good_rows())
    assert detect_format(tmp_path / "j")[0] == "json"
    assert detect_format(tmp_path / "r" / "Tools.inter")[0] == "recbole"
    assert detect_format(tmp_path / "a")[0] == "amazon2023"


def test_kcore_argument_applies_to_every_format(tmp_path):
    inter = {f"u{u}": list(range(6)) if u < 5 else [0, 1, 9] for u in range(7)}
    folder = write_json_layout(tmp_path / "K", "K", inter)
    assert read_domain(folder).num_users == 7  # as read by default
    d = read_domain(folder, kcore=5)
    assert d.num_users == 5 and sorted(d.item_ids) == [str(i) for i in range(6)]


def test_max_users_keeps_a_fixed_uniform_subset_with_its_items():
    """``data.max_users`` (``Domain.sample_users``): n distinct users in their original order, the same ones
    on every call, each with its own sequence; only the items they use, re-indexed; n >= users is a no-op."""
    from megarec.config import DataConfig
    from megarec.methods.training import read_domains

    full = next(d for d in load_sample() if d.name == "Scientific")
    a, b = full.sample_users(50), full.sample_users(50)
    assert a.users == b.users and len(a.users) == len(set(a.users)) == 50
    pos = {u: i for i, u in enumerate(full.users)}
    order = [pos[u] for u in a.users]
    assert order == sorted(order) and order != list(range(50))          # drawn, not the first 50
    for u, seq in zip(a.users, a.sequences):
        assert [a.item_ids[i] for i in seq] == [full.item_ids[i] for i in full.sequences[pos[u]]]
    used = {full.item_ids[i] for u in a.users for i in full.sequences[pos[u]]}
    assert set(a.item_ids) == used and a.num_items < full.num_items
    assert a.item_text == [full.item_text[full.item_ids.index(i)] for i in a.item_ids]
    assert full.sample_users(full.num_users) is full and full.sample_users(50, seed=1).users != a.users
    with pytest.raises(ValueError, match="positive"):
        full.sample_users(0)
    (cut,) = read_domains(DataConfig(paths=[str(SAMPLE_DIR / "Scientific")], max_users=50))
    assert cut.users == a.users
