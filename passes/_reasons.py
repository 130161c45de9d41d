"""Shared wording of rule refusals that the pipeline reads."""

# A check that fails with a reason starting so found its pattern but nothing to change (the
# rewrite's work is already done): the pipeline reports it like a rule with no candidate, not
# as a refusal that says something about the model.
NOTHING_TO_DO = "nothing to do: "
