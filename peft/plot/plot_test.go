package plot_test

import (
	"image/color"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/plot"
)

func TestWritePNGDrawsEachSeries(t *testing.T) {
	var falling, flat []float64
	for i := range 100 {
		falling = append(falling, 2*math.Exp(-float64(i)/20))
		flat = append(flat, 1)
	}
	path := filepath.Join(t.TempDir(), "loss.png")
	chart := plot.Chart{Title: "loss", XLabel: "step", YLabel: "loss", Smooth: 5,
		Series: []plot.Series{{Name: "lora", Values: falling}, {Name: "full", Values: flat}}}
	require.NoError(t, chart.WritePNG(path))

	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	img, err := png.Decode(f)
	require.NoError(t, err)
	require.Equal(t, 900, img.Bounds().Dx())
	require.Equal(t, 560, img.Bounds().Dy())
	// Count pixels of the first two palette colours: both lines are drawn.
	counts := map[color.RGBA]int{}
	for y := 0; y < img.Bounds().Dy(); y++ {
		for x := 0; x < img.Bounds().Dx(); x++ {
			r, g, b, _ := img.At(x, y).RGBA()
			counts[color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(b >> 8), 255}]++
		}
	}
	require.Greater(t, counts[color.RGBA{31, 119, 180, 255}], 500)
	require.Greater(t, counts[color.RGBA{255, 127, 14, 255}], 500)
}

func TestNoFiniteValues(t *testing.T) {
	_, err := plot.Chart{Title: "empty", Series: []plot.Series{{Name: "nan", Values: []float64{math.NaN()}}}}.Render()
	require.ErrorContains(t, err, "no finite values")
}
