"""Reporting: what is written for people to read. Nothing here trains or attacks.

    render.py       the one table renderer (terminal text, Markdown, CSV) and fmt_eps; imports no sibling
    eval_tables.py  one evaluation result as tables, with the protocol next to every number
    report.py       `iat report`: runs side by side and their training curves
    plots.py        PNG plots (matplotlib's Agg canvas)
"""
