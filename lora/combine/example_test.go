package combine_test

import (
	"fmt"

	"peft/lora/combine"
)

// Two rank-1 adapters of a [2, 2] layer, combined three ways: cat gives the weighted sum of the
// updates (rank 2); svd, with scales 1, too, at rank 2; linear merges the A's and the B's apart,
// which adds the cross terms Bᵢ·Aⱼ.
func Example() {
	first := &combine.Adapter{Layers: []combine.Layer{{Path: "proj", In: 2, Out: 2, Rank: 1,
		A: []float32{1, 0}, B: []float32{2, 0}, Scale: 1}}} // ΔW = [[2, 0], [0, 0]]
	second := &combine.Adapter{Layers: []combine.Layer{{Path: "proj", In: 2, Out: 2, Rank: 1,
		A: []float32{0, 1}, B: []float32{0, 4}, Scale: 1}}} // ΔW = [[0, 0], [0, 4]]
	for _, typ := range []combine.Type{combine.Cat, combine.SVD, combine.Linear} {
		cfg := combine.DefaultConfig()
		cfg.Type, cfg.Weights = typ, []float64{1, 0.5}
		if typ == combine.SVD {
			cfg.SVDRank = 2
		}
		out, err := combine.Combine([]*combine.Adapter{first, second}, cfg)
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("%-6s rank %d: ΔW = %.3g\n", typ, out.Rank, out.Layers[0].Delta())
	}
	// Output:
	// cat    rank 2: ΔW = [2 0 0 2]
	// svd    rank 2: ΔW = [2 0 0 2]
	// linear rank 1: ΔW = [2 1.41 2.83 2]
}
