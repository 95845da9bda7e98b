package goexec

// Naive returns kernels that compute each product by its definition in plain loops, with
// float64 accumulation. They are slow; tests use them to check the hook's layout handling on
// machines without a BLAS library.
func Naive() Kernels {
	return Kernels{Name: "naive Go loops", Float32: naiveGemm[float32], Float64: naiveGemm[float64]}
}

func naiveGemm[T float32 | float64](transA, transB bool, m, n, k int, a []T, lda int, b []T, ldb int, c []T, ldc int) {
	for i := range m {
		for j := range n {
			var s float64
			for p := range k {
				var av, bv T
				if transA {
					av = a[p*lda+i]
				} else {
					av = a[i*lda+p]
				}
				if transB {
					bv = b[j*ldb+p]
				} else {
					bv = b[p*ldb+j]
				}
				s += float64(av) * float64(bv)
			}
			c[i*ldc+j] = T(s)
		}
	}
}
