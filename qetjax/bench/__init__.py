"""Benchmarking: data, corpora, the configuration mini-language, reports, memory probes, model benchmarks.

* :mod:`qetjax.bench.data`: synthetic matrices and real weights (``qetjax-bench``'s default data);
* :mod:`qetjax.bench.corpus`: frozen text corpora (package data);
* :mod:`qetjax.bench.config`: ``method[:option=value...][+gptq][+mixed]`` configurations;
* :mod:`qetjax.bench.report`: markdown tables and CSV files of result rows;
* :mod:`qetjax.bench.memory`: peak resident memory, in this process or a fresh one;
* :mod:`qetjax.bench.minilm`: the MiniLM end-to-end benchmark (``qetjax-bench --model minilm``).

Nothing is imported here: each module is imported by name (MiniLM's needs the ``models`` extra).
"""
