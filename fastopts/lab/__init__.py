"The visual lab: surfaces, figures and GIFs, figures from real fits, loss landscapes, the gallery (`fastopts viz`)."
