"""drafter_flywheel's train and evaluate tasks, built for where FLYWHEEL_CLUSTER_TASKS says they run.

``local`` (the default): TaskFlow tasks that train and evaluate in the Airflow worker's own process.
``kubernetes``: KubernetesPodOperators: train is ``torchrun`` on the worker image with
``FLYWHEEL_CLUSTER_TRAIN_GPUS`` GPUs (NCCL; 0 GPUs: one CPU process), evaluate runs on the serving image with
its two vLLM servers inside that pod. Both run flywheel/cluster_job.py, which calls the same flywheel.cycle
function as the local task and hands its result back as the task's XCom; the pod templates of the chart
(deploy/helm, ``FLYWHEEL_CLUSTER_POD_TEMPLATE_DIR``) add identity, config, secrets and volumes. Either way
the task ids, pool and timeouts are the same, so the rest of the DAG does not know where they ran.
"""

from datetime import timedelta

from airflow.sdk import get_current_context, task
from flywheel_assets import run_settings

TRAIN_TIMEOUT = timedelta(hours=2)
EVALUATE_TIMEOUT = timedelta(hours=1)
# what a pod gets on its command line, rendered by Airflow when the task runs
WINDOW = "{{ ti.xcom_pull(task_ids='window') | tojson }}"
VERSION = "{{ ti.xcom_pull(task_ids='train')['version'] }}"
CYCLE = "{{ (params.cycle or {}) | tojson }}"


POD_DOCS = {
    "train": "Fine-tune a challenger on the window in a pod (torchrun over the pod's GPUs) and register it.",
    "evaluate": "Paired served evaluation in a serving-image pod: challenger vs champion vs no speculation.",
}


def train_and_evaluate(w):
    """Wire train -> evaluate after the window task's output ``w``; returns the evaluation's XCom."""
    from core.settings import ClusterSettings

    cluster = ClusterSettings()
    if cluster.tasks == "kubernetes":
        train = _pod(
            cluster, "train", cluster.worker_image, cluster.train_gpus, "trainer.yaml", _train_cmd(cluster)
        )
        evaluate = _pod(
            cluster,
            "evaluate",
            cluster.serving_image,
            cluster.evaluate_gpus,
            "evaluator.yaml",
            ["python", "-m", "flywheel.cluster_job", "evaluate", "--version", VERSION],
        )
        w >> [train, evaluate]  # evaluate pulls the window's XCom too
        train >> evaluate
        return evaluate.output
    return evaluate_local(train_local(w), w)


def _train_cmd(cluster) -> list[str]:
    if cluster.train_gpus == 0:
        return ["python", "-m", "flywheel.cluster_job", "train"]
    return [
        "torchrun",
        "--standalone",
        f"--nproc-per-node={cluster.train_gpus}",
        "-m",
        "flywheel.cluster_job",
        "train",
    ]


def _pod(cluster, task_id: str, image: str, gpus: int, template: str, cmd: list[str]):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    train = task_id == "train"
    gpu = {"nvidia.com/gpu": str(gpus)} if gpus else None
    return KubernetesPodOperator(
        task_id=task_id,
        doc_md=POD_DOCS[task_id],
        name=f"flywheel-{task_id}",
        namespace=cluster.namespace,
        image=image,
        cmds=cmd[:1],
        arguments=[*cmd[1:], "--window", WINDOW, "--cycle", CYCLE],
        container_resources=k8s.V1ResourceRequirements(requests=gpu, limits=gpu),
        pod_template_file=str(cluster.pod_template_dir / template) if cluster.pod_template_dir else None,
        in_cluster=cluster.in_cluster,
        config_file=str(cluster.kube_config) if cluster.kube_config else None,
        startup_timeout_seconds=cluster.startup_timeout_s,
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",  # a failed pod stays for its logs and events
        labels={"app.kubernetes.io/part-of": "spec-flywheel", "flywheel/task": task_id},
        pool="training" if train else "default_pool",
        execution_timeout=TRAIN_TIMEOUT if train else EVALUATE_TIMEOUT,
        retry_exponential_backoff=2.0 if train else 0,
    )


@task(task_id="train", pool="training", execution_timeout=TRAIN_TIMEOUT, retry_exponential_backoff=2.0)
def train_local(w: dict) -> dict:
    """Fine-tune a challenger on the window and register it (reused if this window trained one)."""
    from consumers.windows import TraceWindow
    from flywheel.cycle import train_challenger

    settings = run_settings(get_current_context()["params"])
    return train_challenger(settings, TraceWindow.model_validate(w)).model_dump(mode="json")


@task(task_id="evaluate", execution_timeout=EVALUATE_TIMEOUT)
def evaluate_local(trained: dict, w: dict) -> dict:
    """Paired served evaluation: challenger vs champion vs no speculation on held-out traffic."""
    from consumers.windows import TraceWindow
    from flywheel.cycle import evaluate_challenger

    settings = run_settings(get_current_context()["params"])
    window = TraceWindow.model_validate(w)
    return evaluate_challenger(settings, trained["version"], window).model_dump(mode="json")
