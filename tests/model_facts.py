"""Facts about the model's output that tests check audio against (not needed by the product)."""

from tasks.text.lengths import SAMPLES_PER_STEP


def steps_to_samples(steps: int) -> int:
    """Samples Vocos returns for `steps` GPT steps (2 frames each; centred ISTFT drops one hop)."""
    return max(0, SAMPLES_PER_STEP * steps - SAMPLES_PER_STEP // 2)
