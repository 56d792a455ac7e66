"""The transfer-set augmentation of distil.py (Tang et al. 2019's three rules) on
hand-made sentences, its duplicates dropped, and the loss's treatment of synthetic
rows."""
import pytest
import torch
import torch.nn.functional as F

from train_utils import distillation_loss, make_training, TrainConfig, train_epoch
from distil import AugmentConfig, Synthetic, WordSwapper, augment, drop_duplicates, split_words
from utils import Split, TokenizedSplit

CORPUS = ["The cat sat on the mat.", "The dog sat on the rug.", "A bird sang in the tree.",
          "John won't eat the cake, will he?", "Mary saw the dog."]


def test_split_words_joins_back():
    for sentence in CORPUS + ["  Spaces   inside  . ", "Don't—stop!", "Äpfel und Birnen."]:
        pieces = split_words(sentence)
        assert "".join(space + word for space, word in pieces) == sentence.rstrip()
    assert [w for _, w in split_words("John won't eat, will he?")] == ["John", "won't", "eat", ",", "will", "he",
                                                                         "?"]


def test_no_rule_gives_the_sentence_back():
    cfg = AugmentConfig(copies=3, mask_prob=0, swap_prob=0, ngram_prob=0)
    synthetic = augment(CORPUS, cfg)
    assert len(synthetic) == 3 * len(CORPUS)
    assert [s.render("[MASK]") for s in synthetic] == [s for s in CORPUS for _ in range(3)]


def test_same_seed_same_sentences_other_seed_others():
    def texts(seed):
        return [s.render("[MASK]") for s in augment(CORPUS * 4, AugmentConfig(copies=5, seed=seed))]
    assert texts(0) == texts(0)
    assert texts(0) != texts(1)
    assert len(set(texts(0))) > 10  # the rules really do change sentences


def test_masking_replaces_every_word_not_punctuation():
    synthetic = augment(["The cat, sat."], AugmentConfig(copies=2, mask_prob=1.0, swap_prob=0, ngram_prob=0))
    assert [s.render("[MASK]") for s in synthetic] == ["[MASK] [MASK], [MASK]."] * 2
    assert synthetic[0].render("<|endoftext|>") == "<|endoftext|> <|endoftext|>, <|endoftext|>."


def test_swapping_takes_a_word_of_the_same_slot():
    swapper = WordSwapper(CORPUS)
    words = [w for _, w in split_words("The cat sat on the mat.")]
    rng = __import__("random").Random(0)
    # "cat" sits between "the" and "sat"; so does only "dog" in the corpus
    assert {swapper.swap(words, 1, rng) for _ in range(20)} == {"dog"}
    # "The" between the sentence start and "cat": no other filler there, so the left slot (sentence start:
    # the, a, john, mary) decides; the original's capital is kept
    assert {swapper.swap(words, 0, rng) for _ in range(50)} == {"A", "John", "Mary"}
    # a word in slots nothing else was seen in stays
    assert swapper.swap(["zebra", "quux"], 1, rng) == "quux"
    synthetic = augment(CORPUS[:2], AugmentConfig(copies=1, mask_prob=0, swap_prob=1.0, ngram_prob=0, seed=3))
    first = [w for _, w in synthetic[0].pieces]
    assert first[1] == "dog" and first[-1] == "."


def test_ngram_sampling_keeps_a_contiguous_piece():
    sentence = "one two three four five six seven eight nine ten"
    words = sentence.split()
    synthetic = augment([sentence], AugmentConfig(copies=50, mask_prob=0, swap_prob=0, ngram_prob=1.0,
                                                  max_ngram=3, seed=1))
    lengths = set()
    for s in synthetic:
        kept = s.render("[MASK]").split()
        lengths.add(len(kept))
        start = words.index(kept[0])
        assert kept == words[start:start + len(kept)]
    assert lengths == {1, 2, 3}


def test_duplicates_of_synthetic_or_training_sentences_are_dropped():
    training = ["The cat sat.", "A dog ran.", "The [MASK] sat."]
    masked = [("", "The"), (" ", None), (" ", "sat"), ("", ".")]
    synthetic = [Synthetic(split_words("The cat sat.")),       # a training sentence, unchanged: dropped
                 Synthetic(masked),                            # kept
                 Synthetic(split_words("A dog sat.")),         # kept
                 Synthetic(masked),                            # repeats the second: dropped
                 Synthetic([("", "The"), (" ", "cat"), (" ", None), ("", ".")]),  # another word masked: kept
                 Synthetic(split_words("A dog sat.")),         # repeats the third: dropped
                 Synthetic([("", "A"), (" ", "dog"), (" ", "ran"), ("", ".")]),   # an n-gram as long as the
                 Synthetic([("", "dog")])]                     # sentence (dropped), and a real n-gram (kept)
    kept, dropped = drop_duplicates(synthetic, training)
    assert dropped == 4
    # the first of each is kept, in order; a masked word is never the literal text of a mask token
    # ("The [MASK] sat." was a training sentence), whatever the model renders masks as
    assert [s.render("[MASK]") for s in kept] == ["The [MASK] sat.", "A dog sat.", "The cat [MASK].", "dog"]
    assert kept[0] is synthetic[1] and kept[1] is synthetic[2]


def test_augmented_corpus_has_no_duplicates_left_and_the_seed_decides():
    corpus = CORPUS * 3  # the same sentence thrice: its copies repeat one another often

    def kept(seed):
        synthetic = augment(corpus, AugmentConfig(copies=4, seed=seed))
        return [s.render("[MASK]") for s in drop_duplicates(synthetic, corpus)[0]], len(synthetic)
    texts, total = kept(0)
    assert len(set(texts)) == len(texts) < total and not set(texts) & set(corpus)
    assert kept(0) == (texts, total) and kept(1)[0] != texts


# ---------------------------------------------------------------------------
# Synthetic rows (label -1) get the teacher term only
# ---------------------------------------------------------------------------

def test_synthetic_rows_never_enter_the_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    labels = torch.tensor([1, -1, 0, -1])
    alpha, temperature = 0.3, 2.0
    loss = distillation_loss(student, teacher, labels, alpha, temperature)
    soft = (F.softmax(teacher / temperature, -1) * (F.log_softmax(teacher / temperature, -1)
                                                    - F.log_softmax(student / temperature, -1))).sum(-1)
    hard = -F.log_softmax(student, -1)[[0, 2], labels[[0, 2]]]
    by_hand = (alpha * temperature ** 2 * soft.sum() + (1 - alpha) * hard.sum()) / 4
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), abs=1e-12)
    loss.backward()
    # a synthetic row's gradient is the teacher term's alone, whatever label it might have had
    soft_grad = alpha * temperature * (F.softmax(student.detach() / temperature, -1)
                                       - F.softmax(teacher / temperature, -1)) / 4
    torch.testing.assert_close(student.grad[[1, 3]], soft_grad[[1, 3]])
    # while a real row's gradient has the label's part too
    assert (student.grad[[0, 2]] - soft_grad[[0, 2]]).abs().max() > 1e-3


def test_training_metrics_count_real_sentences_only():
    from model import DistilRNN, RNNConfig
    sentences = ["The cat sat.", "A dog ran.", "Birds sing.", "Cats sat the.", "Ran dog a."]
    labels = [1, 1, 1, -1, -1]
    split = TokenizedSplit(Split(sentences, labels, "mixed"))
    torch.manual_seed(0)
    student = DistilRNN(RNNConfig(n_embd=8, hidden=8))
    cfg = TrainConfig(epochs=1, batch_size=2)
    training = make_training(student, cfg, 3)
    teacher = torch.randn(5, 2)

    def loss_fn(logits, batch):
        return distillation_loss(logits, teacher[batch.rows], batch.labels, 0.5, 2.0)
    loss, predictions, seen_labels = train_epoch(student, split.batches(2), training, torch.device("cpu"), loss_fn)
    assert sorted(seen_labels.tolist()) == [1, 1, 1] and len(predictions) == 3
    assert loss > 0
