package goexec

import "testing"

// BenchmarkExp32 times the float32 exponential over 64K values (split over the cores, AVX2 where
// the CPU has it); ns/value is per value.
func BenchmarkExp32(b *testing.B) {
	in := make([]float32, 1<<16)
	out := make([]float32, len(in))
	for i := range in {
		in[i] = float32(i%2000)/100 - 15
	}
	b.ResetTimer()
	for range b.N {
		exp32s(in, out)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(in)), "ns/value")
}
