"""The preference-labeling loop (Llama 2 sec. 3.2.1): generate pairs -> label -> export.

    config.py    LabelConfig / AutoLabelConfig (the `label:` section)
    store.py     LabelStore: rounds, pairs, labelers (token hashes), assignments, labels (SQLAlchemy 2)
    server.py    create_app(store): the labeling page and the JSON API (FastAPI)
    page.py      the self-contained labeling page and the admin view
    markdown.py  render: a safe Markdown subset (escaped first) for the page's answers and prompts
    generate.py  generate_round: two responses per prompt via the rollout engine (+ gold pairs) -> round N
    auto.py      the automatic labeler (reward models or rules), over the same HTTP API
    export.py    majority labels -> canonical preference records (preference.jsonl)
    agreement.py agreement with the majority, Cohen's / Fleiss' kappa, gold accuracy, time per label
    report.py    those figures for `align label status`, the admin view, quality.md and the run report
    stage.py     run_label_round: generate -> auto label -> export, for one round
    cli.py       `align label ...`

Importing this package imports none of them.
"""
