#!/bin/bash
# bench/gpu_paths.py on a lent GPU machine that has Python 3.12 + CUDA torch and nothing else of ours (no network):
# the packages it lacks travel as wheels in .whl/, the student's config and tokenizer in .gpu/student/ (both ignored
# by git, named in the device call's `carry`). Prepared here, once:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 hjson==3.1.0 \
#     xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
#   pip download --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
#   mkdir -p .gpu/student && cp OUT/student/base/{config.json,tokenizer*.json,generation_config.json} .gpu/student/
# Then the device command is `bash bench/gpu_device.sh`; its results land in $OUT (gpu.log, gpu_paths.json).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 11
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
  --target /tmp/site-ds .whl/deepspeed-*.tar.gz || exit 12
cp -r /tmp/site-ds/. /tmp/site/
# memlora.* is this tree's top-level folders (what the editable install maps), in every process (DeepSpeed's ranks)
cat > /tmp/site/sitecustomize.py <<PY
import importlib.util, pathlib, sys
ROOT = pathlib.Path("$PWD")
PACKAGES = {"memlora": ROOT / "memlora", **{f"memlora.{n}": ROOT / n for n in
            ("data", "evaluation", "flows", "llm", "memory", "student", "tasks", "teacher")}}
class TreeFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = PACKAGES.get(name)
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
               submodule_search_locations=[str(folder)]) if folder else None
sys.meta_path.insert(0, TreeFinder)
PY
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH MEMLORA_BENCH_RESULTS=$OUT
python3 -c "import memlora.config, deepspeed, xgrammar, transformers, peft" || exit 13
python3 bench/gpu_paths.py --student-dir .gpu/student 2>&1 | grep -v "Writing model shards\|Loading weights" \
  | tee $OUT/gpu.log
