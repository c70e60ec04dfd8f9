"""Scaling studies: a family of model sizes x token budgets per method, trained through the study
machinery; the law L(N, D) = E + A/N^alpha + B/D^beta fitted per method; compute-optimal model
sizes with per-method FLOPs per token; figures and a report comparing dense and low-rank frontiers."""
