"""core: settings, prompts, process supervision, the target model and the shared definitions (tau,
drafter artifacts). The bottom layer: imports no other package of this project."""
