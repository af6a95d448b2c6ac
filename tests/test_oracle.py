"""The planted truth in a prepared dataset's ids: a hand-computed case."""

import numpy as np
import pytest

from input_pipeline import oracle, records

TRUTH = dict(
    users=np.array(["u1", "u2"]), log_pi=np.log([0.25, 0.75]),
    theta=np.array([[1.0, 0.0], [0.5, 0.5]]),
    words=np.array(["a", "b"]), log_phi=np.log([[0.9, 0.1], [0.2, 0.8]]),
    mu=np.array([[1.0, 0.0], [0.0, 1.0]]),
    post_ids=np.array(["p2", "p1"]), post_topics=np.array([1, 0]))
VOCAB = ["<pad>", "<unk>", "b", "c", "a"]    # "c": not in the truth
USERS = ["u2", "u1", "u3"]                    # "u3": unknown to the truth


@pytest.fixture
def data_dir(tmp_path):
  oracle.write_truth(str(tmp_path / oracle.ORACLE_FILE), **TRUTH)
  records.write_lines(str(tmp_path), records.VOCAB_FILE, VOCAB)
  records.write_lines(str(tmp_path), records.USERS_FILE, USERS)
  return str(tmp_path)


def test_scores_in_the_datasets_ids_by_hand(data_dir):
  o = oracle.load(data_dir)
  # "a b c" and "<unk> <pad>": p(text | z) = phi_z(a) phi_z(b) = (.09, .16); no evidence.
  tokens = np.array([[4, 2, 3], [1, 0, 0]])
  mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
  want = np.array([[0.75 * (0.5 * 0.09 + 0.5 * 0.16), 0.25 * 0.09, 0.0],
                   [0.75, 0.25, 0.0]])
  np.testing.assert_allclose(np.exp(o.text_user(tokens, mask)), want, rtol=1e-5)
  # Image x = (2, 0): log N(x; mu_z, I) + const = (1.5, -0.5).
  got = np.exp(o.image_user(np.array([[2.0, 0.0]])))
  e = np.exp([1.5, -0.5])
  np.testing.assert_allclose(got, [[0.75 * 0.5 * e.sum(), 0.25 * e[0], 0.0]], rtol=1e-5)
  # user->text: the posterior P(u | text) per column.
  post = np.exp(o.user_text(tokens, mask))
  np.testing.assert_allclose(post[:, 0], want[0] / want[0].sum(), rtol=1e-5)
  # Actions: (theta_u[z] + 0.01) x 3 when followed; u2 on p1 (topic 0), u1 on p2 (topic 1).
  np.testing.assert_allclose(
      np.exp(o.action_scores(np.array([0, 1]), ["p1", "p2"], np.array([True, False]))),
      [(0.5 + 0.01) * 3, 0.01], rtol=1e-5)
  with pytest.raises(ValueError, match="'p9' is not in the planted truth"):
    o.topics(["p1", "p9"])


def test_no_truth_file_is_no_oracle_and_a_bad_one_is_one_line(data_dir, tmp_path):
  assert oracle.load(str(tmp_path / "elsewhere")) is None
  bad = tmp_path / "bad.npz"
  records.save_npz(str(bad), users=TRUTH["users"])
  with pytest.raises(ValueError, match=r"lacks \['log_pi'"):
    oracle.read_truth(str(bad))
  bad.write_text("not a zip")
  with pytest.raises(ValueError, match="is not a truth file"):
    oracle.read_truth(str(bad))
