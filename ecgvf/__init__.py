"""earkit.ecgvf: the ECGVF benchmark: prompt pairs, the visual filter and its judges, metrics, reports."""

if __name__ != "earkit.ecgvf":  # imported as a top-level `ecgvf`: see earkit/_source_folder.py
    from earkit._source_folder import refusal

    __getattr__ = refusal(__name__)
else:
    from .pair_generation import (
        BackendError,
        OpenAIChatBackend,
        TemplateBackend,
        TransformersBackend,
        add_pairs_arguments,
        check_pair,
        extract_pair_list,
        generate_pairs,
        load_examples,
        pair_request_messages,
        run_pairs,
        validate_items,
        write_generated,
    )

    from .benchmark import Benchmark, BenchmarkPrompt, load_benchmark
    from .evaluate import add_eval_arguments, evaluate, run_eval
    from .filter import FilterRules, add_filter_arguments, filter_pairs, filter_pairs_with_model, run_filter, write_filter_results
    from .judges import Judge, NudeNetJudge, OpenClipJudge, ResNet50Judge, ShapesWorldJudge, parse_judge

    __all__ = [
        "generate_pairs", "write_generated", "pair_request_messages", "load_examples",
        "TemplateBackend", "OpenAIChatBackend", "TransformersBackend", "BackendError",
        "extract_pair_list", "check_pair", "validate_items", "add_pairs_arguments", "run_pairs",
        "Judge", "ShapesWorldJudge", "OpenClipJudge", "NudeNetJudge", "ResNet50Judge", "parse_judge",
        "FilterRules", "filter_pairs", "filter_pairs_with_model", "write_filter_results", "add_filter_arguments",
        "run_filter", "Benchmark", "BenchmarkPrompt", "load_benchmark", "evaluate", "add_eval_arguments", "run_eval",
    ]
