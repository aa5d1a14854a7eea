"""The effectiveness benchmark's own logic: which cells run and on what data (`cells`), ForgetFilter
(`forgetfilter`), the immunization conditions of Rosati et al. 2024 (`immunization`), aggregation, targets,
tables and plots (`tables`).

Every arm is trained and evaluated by the pipeline's own code (guarded.finetune, strip, evaluate_model);
this package only decides what each arm sees and how the results are compared.
"""
