"""Pages about runs: ``report.html`` per run (`run_page`), the comparison page (`compare`), their
SVG plots (`plots`, matplotlib) and the logs they read (`logs`). Everything is read back from the
files a run wrote, so any page can be rebuilt later from the run folders alone."""
