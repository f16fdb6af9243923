"""The guard against distilling from a weak teacher: soft targets only help when the teacher is
clearly ahead of the student, so kdcache says so plainly wherever it knows both accuracies."""

from __future__ import annotations

REMEDIES = (
    "train the teacher longer, distil from an ensemble (dump-logits --teacher A --teacher B, or "
    "pipeline --teachers N), or start from `kdcache teacher --preset cifar10-fast`"
)


def weak_teacher(teacher_acc: float | None, student_acc: float | None, student: str) -> str | None:
    """A one-line warning when the teacher's test accuracy is not above `student`'s, else None."""
    if teacher_acc is None or student_acc is None or teacher_acc > student_acc:
        return None
    return (
        f"the teacher ({100 * teacher_acc:.2f}% test accuracy) is not better than {student} "
        f"({100 * student_acc:.2f}%): distilling from it can cost accuracy; {REMEDIES}"
    )
