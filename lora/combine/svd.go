package combine

import (
	"errors"
	"math"
	"slices"

	"gonum.org/v1/gonum/mat"
)

// truncatedSVD factors the row-major [rows, cols] matrix d as U·diag(S)·Vᵀ (gonum's SVD, float64,
// thin factors) and returns its best rank-k approximation as b = U_k·diag(S_k) [rows, k] and
// a = V_kᵀ [k, cols], row-major: PEFT's lora_B and lora_A. k ≤ min(rows, cols).
func truncatedSVD(d []float64, rows, cols, k int) (b, a []float64, err error) {
	var svd mat.SVD
	if !svd.Factorize(mat.NewDense(rows, cols, d), mat.SVDThin) {
		return nil, nil, errors.New("the singular value decomposition did not converge")
	}
	values := svd.Values(nil)
	var u, v mat.Dense
	svd.UTo(&u)
	svd.VTo(&v)
	b = make([]float64, rows*k)
	for i := range rows {
		for j := range k {
			b[i*k+j] = u.At(i, j) * values[j]
		}
	}
	a = make([]float64, k*cols)
	for j := range k {
		for c := range cols {
			a[j*cols+c] = v.At(c, j)
		}
	}
	return b, a, nil
}

// clampQuantile is PEFT's svd_clamp: with hi the q quantile of the entries of b and a together
// (torch.quantile, linear interpolation), every entry of both is clamped to [−hi, hi] (torch's
// clamp(x, min, max) = min(max(x, min), max), also when hi < 0).
func clampQuantile(b, a []float64, q float64) {
	hi := quantile(append(slices.Clone(b), a...), q)
	for _, v := range [][]float64{b, a} {
		for i, x := range v {
			v[i] = math.Min(math.Max(x, -hi), hi)
		}
	}
}

// quantile is torch.quantile(x, q) with linear interpolation: x is sorted in place.
func quantile(x []float64, q float64) float64 {
	slices.Sort(x)
	pos := q * float64(len(x)-1)
	lo := math.Floor(pos)
	hi := math.Ceil(pos)
	return x[int(lo)] + (x[int(hi)]-x[int(lo)])*(pos-lo)
}
