from diffq.markdown import Markdown, cell


def test_cells_are_formatted_one_way():
    assert [cell(v) for v in (0.123456, float("inf"), 1234567, True, None, "a|b\nc")] == \
        ["0.1235", "inf", "1,234,567", "yes", "-", "a\\|b c"]


def test_blocks_are_separated_and_tables_well_formed():
    md = Markdown("title").text("one", "two").table(["a", "b"], [(1, 2.5), ("x", None)])
    md.warnings(["careful"]).image("g.png", "grid").bullets([]).text()
    assert str(md) == ("# title\n\none\ntwo\n\n| a | b |\n|---|---|\n| 1 | 2.5 |\n| x | - |\n\n"
                       "> warning: careful\n\n![grid](g.png)\n")
