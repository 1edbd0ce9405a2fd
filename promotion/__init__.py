"""promotion: the MLflow drafter registry (aliases champion/challenger/previous) and promotion events."""
