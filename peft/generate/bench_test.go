package generate

import (
	"testing"

	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
)

// BenchmarkGenerate measures greedy generation with and without the key/value cache, in new
// tokens per second (compilation excluded: one generation runs before the timer): on stories260K
// (64 new tokens after <s>) and on a random Llama of width 256, 4 layers (128 new tokens).
//
//	go test ./peft/generate -run '^$' -bench Generate -benchtime 5x
func BenchmarkGenerate(b *testing.B) {
	d256 := llama.Config{VocabSize: 512, HiddenSize: 256, IntermediateSize: 688, NumLayers: 4, NumHeads: 8,
		NumKVHeads: 4, MaxPositions: 512, RMSNormEps: 1e-5, RopeTheta: 10000}
	for _, model := range []struct {
		name   string
		newTok int
		build  func(testing.TB) *peft.Model
	}{
		{"stories260K", 64, func(tb testing.TB) *peft.Model { _, m := pefttest.StoriesModel(tb, nil); return m }},
		{"llama_d256_l4", 128, func(tb testing.TB) *peft.Model { return pefttest.NewLlama(tb, d256, 0, nil, 1, 16) }},
	} {
		m := model.build(b)
		for _, mode := range []struct {
			name    string
			noCache bool
		}{{"cache", false}, {"nocache", true}} {
			b.Run(model.name+"/"+mode.name, func(b *testing.B) {
				cfg := Config{MaxNewTokens: model.newTok, NoCache: mode.noCache}
				if _, err := Generate(m, []int{1}, cfg); err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				for range b.N {
					if _, err := Generate(m, []int{1}, cfg); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(model.newTok*b.N)/b.Elapsed().Seconds(), "tokens/s")
			})
		}
	}
}
