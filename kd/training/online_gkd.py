"""Online distillation with the teacher in the loop: TRL's ``GKDTrainer``, what the cache approximates.

Settings: ``lmbda=0`` (off-policy: the student never generates), ``beta=0`` (TRL's generalized JSD is then the
forward KL(teacher ‖ student) over the full vocabulary, the divergence stage two's forward KL approximates on
the cached top-K plus a tail bucket), ``seq_kd=False``, loss temperature 1.

Two ways to feed the teacher:

- ``teacher_sees="student"``: TRL's own ``GKDTrainer``, the teacher scores the student's sequence (what the
  benchmark times: the cost of a teacher forward per step).
- ``teacher_sees="fewshot"``: the teacher scores the same few-shot sequence stage one caches
  (``teacher_input_ids``), and its logits at the answer positions of that sequence are compared with the
  student's at the same answer tokens, so online and cached KD distil the same teacher distribution.

Checkpoints are written in stage two's layout (``checkpoints/step-NNNNNN/{trainable_weights.pt,
trainer_state.json}``), so ``stages.evaluate`` scores them like any stage-two run.

TRL is an optional dependency (the ``dev`` and ``bench`` extras): it is imported only when a run starts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd.config import Config
from kd.errors import UserError
from kd.tokenizer import pad_token_id
from kd.training import checkpoints as ckpt

GKD_SETTINGS = {"lmbda": 0.0, "beta": 0.0, "temperature": 1.0, "seq_kd": False}
TEACHER_INPUTS = ("student", "fewshot")
"""What the online teacher scores: the student's own sequence (TRL's default) or the cached few-shot one."""


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask of right-padded ``rows``."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


class AnswerCollator:
    """Right-pads input_ids; labels are the token ids at the answer positions, -100 elsewhere.

    GKDTrainer shifts labels by one (logits at p - 1 predict labels[p]), the same alignment as the cache. With
    ``teacher_input_ids`` in the features it also pads the teacher's sequences and gives the answer positions
    of both sides as [B, A] index tensors (A: the longest answer; ``answer_mask`` marks the real ones).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = right_padded([f["input_ids"] for f in features], self.pad_id)  # [B, T]
        labels = torch.full_like(input_ids, -100)
        for row, f in enumerate(features):
            positions = torch.tensor(f["label_positions"], dtype=torch.long)
            labels[row, positions] = input_ids[row, positions]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "teacher_input_ids" in features[0]:
            batch.update(self._teacher_side(features, input_ids))
        return batch

    def _teacher_side(self, features: list[dict[str, Any]], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_ids, teacher_mask = right_padded([f["teacher_input_ids"] for f in features], self.pad_id)
        answers = max(len(f["label_positions"]) for f in features)
        student_pos = torch.ones((len(features), answers), dtype=torch.long)  # [B, A]; 1 is a harmless pad
        teacher_pos = torch.ones_like(student_pos)
        answer_labels = torch.full_like(student_pos, -100)
        for row, f in enumerate(features):
            count = len(f["label_positions"])
            student_pos[row, :count] = torch.tensor(f["label_positions"], dtype=torch.long)
            teacher_pos[row, :count] = torch.tensor(f["teacher_positions"], dtype=torch.long)
            answer_labels[row, :count] = input_ids[row, student_pos[row, :count]]
        return {"teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask,
                "student_answer_positions": student_pos, "teacher_answer_positions": teacher_pos,
                "answer_labels": answer_labels}


def _logits_before(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, A, V] logits that predict the tokens at ``positions`` [B, A] (the outputs at position - 1)."""
    index = (positions - 1).unsqueeze(-1).expand(-1, -1, logits.size(-1))
    return logits.gather(1, index)


def fewshot_trainer_class():
    """GKDTrainer whose teacher scores the few-shot sequences (see the module docstring)."""
    from trl.experimental.gkd import GKDTrainer

    class FewShotTeacherGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_logits = self.teacher_model(input_ids=inputs["teacher_input_ids"],
                                                    attention_mask=inputs["teacher_attention_mask"]).logits
            loss = self.generalized_jsd_loss(
                student_logits=_logits_before(student_outputs.logits, inputs["student_answer_positions"]),
                teacher_logits=_logits_before(teacher_logits, inputs["teacher_answer_positions"]),
                labels=inputs["answer_labels"], beta=self.beta, num_items_in_batch=num_items_in_batch,
            )
            return (loss, student_outputs) if return_outputs else loss

    return FewShotTeacherGKDTrainer


def gkd_arguments(cfg: Config, output_dir: str, max_steps: int, cuda: bool):
    """The GKDConfig of a run of ``cfg``: stage two's batch size, learning rate, warmup, decay and clipping."""
    from trl.experimental.gkd import GKDConfig

    tr = cfg.train
    return GKDConfig(output_dir=output_dir, per_device_train_batch_size=tr.batch_size, max_steps=max_steps,
                     learning_rate=tr.lr, warmup_steps=tr.warmup_steps, lr_scheduler_type="cosine",
                     weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm, logging_strategy="no",
                     save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda, bf16=cuda,
                     dataloader_num_workers=0, seed=cfg.seed, max_length=cfg.data.max_seq_len, **GKD_SETTINGS)


def checkpoint_saver(output_dir: Path, save_every: int, trainable_weights: Callable[[Any], dict]):
    """A TrainerCallback writing stage two's checkpoint layout every ``save_every`` steps and at the end.

    trainable_weights: the model's weights as stage two's checkpoints name them (the student package's
    ``trainable_state_dict`` of its ``DistillStudent`` wrapper; that package sits above this one).
    """
    from transformers import TrainerCallback

    class SaveTrainable(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % save_every and state.global_step != state.max_steps:
                return
            final = output_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(state.global_step)
            final.mkdir(parents=True, exist_ok=True)
            torch.save(trainable_weights(model), final / ckpt.WEIGHTS_FILE)
            trainer_state = {"step": state.global_step, "trainer": "trl GKDTrainer", **GKD_SETTINGS}
            (final / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state, sort_keys=True) + "\n")

    return SaveTrainable()


def train_online_gkd(cfg: Config, student, tokenizer, train_rows: list[dict[str, list[int]]], *,
                     trainable_weights: Callable[[Any], dict], teacher_sees: str = "fewshot",
                     echo: Callable = print) -> dict[str, Any]:
    """Train ``student`` (built from ``cfg.student``) for ``cfg.train.max_steps`` with the teacher in the loop.

    train_rows: per sample ``input_ids`` and ``label_positions`` (and, for ``teacher_sees="fewshot"``,
    ``teacher_input_ids`` and ``teacher_positions``), e.g. stage one's aligned samples. Checkpoints go to
    ``cfg.train.output_dir`` every ``train.save_every`` steps (``eval_every`` when 0) and at the end.
    """
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, PrinterCallback
    except ImportError as exc:
        raise UserError(f"online distillation needs TRL and datasets ({exc}); pip install -e '.[bench]'") from None

    if teacher_sees not in TEACHER_INPUTS:
        raise ValueError(f"teacher_sees must be one of {TEACHER_INPUTS}, got {teacher_sees!r}")
    cuda = torch.cuda.is_available()
    output_dir = Path(cfg.train.output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a study's own run directory: a rerun starts over
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.bfloat16 if cuda else torch.float32)
    trainer_class = fewshot_trainer_class() if teacher_sees == "fewshot" else _plain_trainer_class()
    scratch = tempfile.mkdtemp(prefix="gkd-")
    try:
        trainer = trainer_class(
            model=student, teacher_model=teacher, args=gkd_arguments(cfg, scratch, cfg.train.max_steps, cuda),
            train_dataset=Dataset.from_list(train_rows), data_collator=AnswerCollator(pad_token_id(tokenizer)),
            processing_class=tokenizer,
            callbacks=[checkpoint_saver(output_dir, cfg.train.save_every or cfg.train.eval_every, trainable_weights)],
        )
        trainer.remove_callback(PrinterCallback)
        echo(f"  online GKD ({teacher_sees} teacher input): {cfg.train.max_steps} steps -> {output_dir}")
        outcome = trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"steps": cfg.train.max_steps, "train_loss": float(outcome.training_loss), "output_dir": str(output_dir)}


def _plain_trainer_class():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer
