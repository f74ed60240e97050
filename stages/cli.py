"""The ``dfkd`` console script: one sub-command per pipeline stage."""

from __future__ import annotations

import typer

from stages import augment, bank, distill, evaluate, export, report, synthesize, teacher
from stages import pool as pool_stage
from stages import prior as prior_stage
from stages import retrieve as retrieve_stage

app = typer.Typer(
    help="dfkd: data-free knowledge distillation. Stages: teacher (train | import) -> synthesize | retrieve -> "
         "augment -> distill -> report, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(teacher.app, name="teacher")
app.add_typer(bank.app, name="bank")
app.command("synthesize")(synthesize.main)
app.add_typer(pool_stage.app, name="pool")
app.add_typer(prior_stage.app, name="prior")
app.command("retrieve")(retrieve_stage.main)
app.command("augment")(augment.main)
app.command("distill")(distill.main)
app.command("evaluate")(evaluate.main)
app.command("report")(report.main)
app.command("export")(export.main)


@app.command("methods")
def methods() -> None:
    """List every registry: datasets, models, generators, synthesis methods and terms, student terms, online
    methods."""
    from dfkd_common.data import DATASETS
    from dfkd_common.models import GENERATORS, MODELS
    from dfkd_common.online import online_methods
    from dfkd_common.student import STUDENT_TERMS
    from dfkd_common.synthesis import SYNTHESIZERS
    from dfkd_common.synthesis.losses import TERMS
    from dfkd_common.variation.models import VARIATIONS

    for title, names in (("datasets", DATASETS.names()), ("models", MODELS.names()),
                         ("generators", GENERATORS.names()), ("synthesis methods", SYNTHESIZERS.names()),
                         ("synthesis loss terms", TERMS.names()), ("student terms", STUDENT_TERMS.names()),
                         ("online methods", online_methods()), ("variation models", VARIATIONS.names())):
        typer.echo(f"{title}: {', '.join(names)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
