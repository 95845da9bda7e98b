package combine

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
)

// rule is one of PEFT's merge_utils functions, which merge task tensors tᵢ (same shape) with
// weights wᵢ into one.
type rule int

const (
	// ruleTaskArithmetic is task_arithmetic: Σ wᵢ·tᵢ.
	ruleTaskArithmetic rule = iota
	// ruleMagnitudePrune is magnitude_prune: magnitude pruning of each tᵢ, then Σ wᵢ·tᵢ.
	ruleMagnitudePrune
	// ruleTIES is ties: magnitude pruning, sign election, disjoint merge.
	ruleTIES
	// ruleDARELinear is dare_linear: random pruning with rescaling, then Σ wᵢ·tᵢ.
	ruleDARELinear
	// ruleDARETIES is dare_ties: random pruning with rescaling, sign election, disjoint merge.
	ruleDARETIES
)

// prunes reports whether the rule uses a density.
func (r rule) prunes() bool { return r != ruleTaskArithmetic }

// merger applies a rule with its parameters; rng draws DARE's masks.
type merger struct {
	rule    rule
	density float64
	sign    string
	rng     *rand.Rand
}

// merge merges ts with weights ws by the merger's rule (ts are not modified).
func (m *merger) merge(ts [][]float64, ws []float64) []float64 {
	pruned := make([][]float64, len(ts))
	for i, t := range ts {
		switch m.rule {
		case ruleMagnitudePrune, ruleTIES:
			pruned[i] = magnitudePrune(t, m.density)
		case ruleDARELinear, ruleDARETIES:
			pruned[i] = randomPrune(t, m.density, m.rng)
		default:
			pruned[i] = t
		}
	}
	if m.rule == ruleTIES || m.rule == ruleDARETIES {
		return disjointMerge(pruned, ws, majoritySignMask(pruned, m.sign))
	}
	return taskArithmetic(pruned, ws)
}

// taskArithmetic is PEFT's task_arithmetic: Σ wᵢ·tᵢ.
func taskArithmetic(ts [][]float64, ws []float64) []float64 {
	out := make([]float64, len(ts[0]))
	for i, t := range ts {
		for j, x := range t {
			out[j] += ws[i] * x
		}
	}
	return out
}

// magnitudePrune is PEFT's prune(method="magnitude"): t unchanged for density ≥ 1, otherwise
// only its k = ⌊density·n⌋ entries of largest magnitude (torch.topk; ties go to the lower
// index here, where torch leaves the order unspecified).
func magnitudePrune(t []float64, density float64) []float64 {
	if density >= 1 {
		return t
	}
	k := int(density * float64(len(t)))
	order := make([]int, len(t))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(math.Abs(t[b]), math.Abs(t[a])) })
	out := make([]float64, len(t))
	for _, i := range order[:k] {
		out[i] = t[i]
	}
	return out
}

// randomPrune is PEFT's prune(method="random", rescale=True): t unchanged for density ≥ 1,
// otherwise each entry kept with probability density (one draw of rng per entry, in order, where
// PEFT calls torch.bernoulli) and divided by density.
func randomPrune(t []float64, density float64, rng *rand.Rand) []float64 {
	if density >= 1 {
		return t
	}
	out := make([]float64, len(t))
	for i, x := range t {
		if rng.Float64() < density {
			out[i] = x / density
		}
	}
	return out
}

// majoritySignMask is PEFT's calculate_majority_sign_mask: per entry, the elected sign is + when
// Σᵢ tᵢ ≥ 0 (SignTotal) or Σᵢ sign(tᵢ) ≥ 0 (SignFrequency), − otherwise; mask[i][j] says whether
// tᵢ's entry has that sign (a zero entry has none).
func majoritySignMask(ts [][]float64, method string) [][]bool {
	n := len(ts[0])
	votes := make([]float64, n)
	for _, t := range ts {
		for j, x := range t {
			if method == SignFrequency {
				x = sign(x)
			}
			votes[j] += x
		}
	}
	mask := make([][]bool, len(ts))
	for i, t := range ts {
		mask[i] = make([]bool, n)
		for j, x := range t {
			elected := 1.0
			if votes[j] < 0 {
				elected = -1
			}
			mask[i][j] = sign(x) == elected
		}
	}
	return mask
}

// disjointMerge is PEFT's disjoint_merge of the weighted tensors wᵢ·tᵢ: per entry, the sum of
// those the mask keeps divided by how many it keeps (at least 1).
func disjointMerge(ts [][]float64, ws []float64, mask [][]bool) []float64 {
	out := make([]float64, len(ts[0]))
	for j := range out {
		kept := 0
		for i, t := range ts {
			if mask[i][j] {
				out[j] += ws[i] * t[j]
				kept++
			}
		}
		out[j] /= float64(max(kept, 1))
	}
	return out
}

// sign is torch.sign: −1, 0 or 1.
func sign(x float64) float64 {
	switch {
	case x > 0:
		return 1
	case x < 0:
		return -1
	}
	return 0
}
