"""earkit.ecgvf: the ECGVF benchmark: prompt pairs, the visual filter and its judges, metrics, reports, attacks."""

if __name__ != "earkit.ecgvf":  # imported as a top-level `ecgvf`: see earkit/_source_folder.py
    from earkit._source_folder import refusal

    __getattr__ = refusal(__name__)
else:
    from .pair_generation import (
        BackendError,
        OpenAIChatBackend,
        TemplateBackend,
        TransformersBackend,
        check_pair,
        extract_pair_list,
        generate_pairs,
        generate_paraphrases,
        load_examples,
        pair_request_messages,
        validate_items,
        write_generated,
    )

    # run_attacks is imported from earkit.ecgvf.attacks: the package exports no run_* (tests/cli/test_layout.py)
    from .attacks import ATTACKS, AttackSettings, write_attack_files
    from .benchmark import Benchmark, BenchmarkPrompt, load_benchmark
    from .evaluate import evaluate
    from .filter import FilterRules, filter_pairs, filter_pairs_with_model, write_filter_results
    from .judges import Judge, NudeNetJudge, OpenClipJudge, ResNet50Judge, ShapesWorldJudge, parse_judge
    from .report import write_report

    __all__ = [
        "generate_pairs", "write_generated", "pair_request_messages", "load_examples",
        "TemplateBackend", "OpenAIChatBackend", "TransformersBackend", "BackendError",
        "extract_pair_list", "check_pair", "validate_items",
        "Judge", "ShapesWorldJudge", "OpenClipJudge", "NudeNetJudge", "ResNet50Judge", "parse_judge",
        "FilterRules", "filter_pairs", "filter_pairs_with_model", "write_filter_results",
        "Benchmark", "BenchmarkPrompt", "load_benchmark", "evaluate", "write_report",
        "generate_paraphrases", "ATTACKS", "AttackSettings", "write_attack_files",
    ]
