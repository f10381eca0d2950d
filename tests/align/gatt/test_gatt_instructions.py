"""The instruction bank: the built-in file, a user's own file, combinations and the short form."""

import random

import pytest

from align.errors import AlignError
from align.gatt.instructions import BUILTIN_BANK, InstructionBank


def test_builtin_bank_has_the_recipe_kinds_and_the_checkable_constraints():
    bank = InstructionBank.load()
    names = {k.name for k in bank.kinds}
    assert {"hobby", "language", "figure"} <= names
    assert {k.check for k in bank.checkable_kinds} == {"capitals", "end_with", "max_words", "include", "avoid_letter"}
    figure = next(k for k in bank.kinds if k.name == "figure")
    part = figure.part(random.Random(0))
    assert part.long.startswith("Act as ") and part.short == f"Figure: {part.value}"
    assert BUILTIN_BANK.is_file()


def test_about_half_the_instructions_are_shortened():
    bank = InstructionBank.load()
    rng = random.Random(123)
    insts = [bank.sample(rng, 0.5) for _ in range(2000)]
    share = sum(i.shortened for i in insts) / len(insts)
    assert 0.45 <= share <= 0.55  # binomial sd 0.011: a 4.5-sd band
    short = next(i for i in insts if i.shortened and len(i.parts) == 1 and i.parts[0].kind == "figure")
    assert short.text.startswith("Figure: ")
    assert all(not i.shortened for i in (bank.sample(rng, 0.0) for _ in range(200)))
    assert all(i.shortened for i in (bank.sample(rng, 1.0) for _ in range(200)))


def test_combinations_mix_kinds_and_never_contradict():
    bank = InstructionBank.load()
    rng = random.Random(0)
    insts = [bank.sample(rng, 0.5) for _ in range(1000)]
    sizes = {len(i.parts) for i in insts}
    assert sizes == {1, 2}  # max_parts: 2
    for i in insts:
        assert len({p.kind for p in i.parts}) == len(i.parts)
        banned = [p.value for p in i.parts if p.check == "avoid_letter"]
        needed = [p.value for p in i.parts if p.check in ("end_with", "include")]
        assert not any(b in n for b in banned for n in needed)
    two = next(i for i in insts if len(i.parts) == 2 and not i.shortened)
    assert two.text == " ".join(p.long for p in two.parts)


def test_instruction_score_and_keeps():
    bank = InstructionBank.from_dict(
        {
            "kinds": {
                "caps": {"long": "Use capitals.", "short": "Caps", "check": "capitals"},
                "end": {"long": "End with {value}.", "short": "End: {value}", "check": "end_with", "values": ["ok"]},
                "fig": {"long": "Act as {value}.", "short": "Figure: {value}", "values": ["Napoleon"]},
            },
            "max_parts": 3,
        }
    )
    from align.gatt.instructions import Instruction

    caps, end, fig = (k.part(random.Random(0)) for k in bank.kinds)
    both = Instruction((caps, end), False)
    assert both.score("FINE, OK") == 1.0 and both.keeps("FINE, OK")
    assert both.score("Fine, ok") == 0.5 and both.keeps("Fine, ok") is False
    assert Instruction((fig,), True).keeps("anything") is None
    assert Instruction((fig, end), True).text == "Figure: Napoleon; End: ok"


def test_a_users_own_bank_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        'max_parts: 1\nkinds:\n  pirate:\n    long: "Talk like a pirate."\n    short: "Style: pirate"\n'
        '  sign:\n    long: "Sign every answer with {value}."\n    short: "Sign: {value}"\n'
        "    check: end_with\n    values: [Ahoy]\n    weight: 3\n"
    )
    bank = InstructionBank.load(path)
    rng = random.Random(0)
    kinds = [bank.sample(rng, 0.5).parts[0].kind for _ in range(400)]
    assert 0.65 < kinds.count("sign") / 400 < 0.85  # weight 3 of 4
    assert [i.text for i in bank.evaluation_set(2, rng)] == ["Sign every answer with Ahoy."] * 2


@pytest.mark.parametrize(
    "raw,msg",
    [
        ({"kinds": {"x": {"long": "a", "short": "b", "check": "rhymes"}}}, "not one of"),
        ({"kinds": {"x": {"long": "a {value}", "short": "b"}}}, "lists no values"),
        ({"kinds": {"x": {"long": "a", "short": "b", "colour": 1}}}, "unknown key"),
        ({"kinds": {"x": {"long": "a"}}}, "'short'"),
        ({"kinds": {}}, "non-empty"),
        (
            {"kinds": {"x": {"long": "{value}", "short": "{value}", "check": "max_words", "values": ["ten"]}}},
            "whole numbers",
        ),
    ],
)
def test_bad_banks_are_rejected_with_a_reason(raw, msg):
    with pytest.raises(AlignError, match=msg):
        InstructionBank.from_dict(raw)


def test_missing_bank_file_names_the_format(tmp_path):
    with pytest.raises(AlignError, match="no such file"):
        InstructionBank.load(tmp_path / "none.yaml")


def test_sample_draws_only_the_kinds_asked_for_and_checkable_names_are_checked():
    bank = InstructionBank.load()
    rng = random.Random(1)
    checkable = bank.checkable_names((), "gatt.reference_kinds")
    assert set(checkable) == {k.name for k in bank.checkable_kinds}
    insts = [bank.sample(rng, 0.5, only=checkable) for _ in range(500)]
    assert all(p.check for i in insts for p in i.parts)
    assert {p.kind for i in insts for p in i.parts} == set(checkable)
    assert {len(i.parts) for i in insts} == {1, 2}
    two = bank.checkable_names(("end_with", "capitals"), "gatt.reference_kinds")
    assert {p.kind for i in (bank.sample(rng, 0.5, only=two) for _ in range(200)) for p in i.parts} == set(two)
    # max_parts (gatt.reference_max_parts) caps the combination; 0 leaves the bank's max_parts
    assert {len(bank.sample(rng, 0.5, only=two, max_parts=1).parts) for _ in range(200)} == {1}
    assert {len(bank.sample(rng, 0.5, only=two, max_parts=0).parts) for _ in range(200)} == {1, 2}
    assert {len(bank.sample(rng, 0.5, only=two, max_parts=5).parts) for _ in range(200)} == {1, 2}
    with pytest.raises(AlignError, match=r"gatt.reference_kinds: \['hobby', 'nope'\] are not checkable"):
        bank.checkable_names(("hobby", "nope"), "gatt.reference_kinds")
    with pytest.raises(AlignError, match="no kind of weight > 0"):
        bank.sample(rng, 0.5, only=("nope",))
