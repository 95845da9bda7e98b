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

// BenchmarkGenerateBatch measures 8 prompts of lengths 1 to 8 on stories260K, 32 greedy new
// tokens each, in new tokens per second: in one GenerateBatch against 8 Generate calls one after
// another (compilation excluded: one run of each before the timer).
//
//	go test ./peft/generate -run '^$' -bench GenerateBatch -benchtime 5x
func BenchmarkGenerateBatch(b *testing.B) {
	_, m := pefttest.StoriesModel(b, nil)
	const rows, newTok = 8, 32
	prompts := make([][]int, rows)
	cfgs := make([]Config, rows)
	for i := range rows {
		prompts[i] = []int{1}
		for j := range i {
			prompts[i] = append(prompts[i], 260+17*i+j)
		}
		cfgs[i] = Config{MaxNewTokens: newTok}
	}
	for _, mode := range []struct {
		name string
		run  func() error
	}{
		{"batch8", func() error { _, err := GenerateBatch(m, prompts, cfgs); return err }},
		{"sequential8", func() error {
			for i := range rows {
				if _, err := Generate(m, prompts[i], cfgs[i]); err != nil {
					return err
				}
			}
			return nil
		}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			if err := mode.run(); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				if err := mode.run(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(rows*newTok*b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
